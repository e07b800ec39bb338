"""dscribe's GTO SOAP, evaluated by a compiled (numba) kernel for the infer stage's hot loop.

The infer stage computes the SOAP rows of every Na of every dense MD frame; there, dscribe's
C++ (scalar, ~90 ``exp`` per neighbour, ~3.3 ms per 88-atom frame of 16 Na) is most of the
time. This kernel computes the SAME features (dscribe is its reference, checked at
construction) ~3x faster (0.97 vs 2.9-3.1 ms per frame, benchmarks/bench_infer.py):

- radial part: dscribe's orthonormalised GTO radial functions of the Gaussian-smeared density,
  ``g_ln(r) = sum_k b[l,n,k] r^l exp(a[l,k] r^2)`` with dscribe's own constants, tabulated
  once on a fine grid (values and exact derivatives) and evaluated by cubic Hermite
  interpolation (error <= 4e-10 of each function's scale) instead of 90 exponentials per neighbour;
- angular part: real orthonormal spherical harmonics by the associated-Legendre recurrence;
- expansion ``c[lm, species*n_max + n] = sum_neighbours g_ln(r) Y_lm`` in float64;
- power spectrum per l as one Gram matrix ``C_l^T C_l`` of all species and radial channels,
  gathered into dscribe's feature order, times dscribe's per-l constant (read off dscribe once
  at construction), and the L2 normalisation of the row.

Neighbours are every periodic image of every atom within ``r_cut + dscribe's cutoff padding``
(dscribe's own neighbour rule). :class:`NumbaGtoSoap` refuses settings it does not cover
(weighting, compression, averaging, non-periodic) and, at construction, compares its
normalised rows with dscribe's on a random periodic frame: ``ok`` is False (and callers use
dscribe) unless they agree within ``CHECK_ATOL``.
"""
from __future__ import annotations

from math import factorial, pi, sqrt

import numpy as np

try:  # numba comes with dscribe (through `sparse`); without it the caller keeps dscribe
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

TABLE_STEP_A = 0.004
"""Grid spacing (A) of the tabulated radial functions (cubic Hermite: at most 4e-10 of each
function's largest value, measured on 20,000 random radii)."""
CHECK_ATOL = 1e-6
"""Largest difference allowed between this kernel's and dscribe's normalised rows."""


def _harmonic_constants(l_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalisation of the real orthonormal Y_lm, the double factorials (2m-1)!!, and the
    associated-Legendre recurrence factors (2l-1)/(l-m), (l+m-1)/(l-m) as ``recur[:, l, m]``."""
    n_l = l_max + 1
    norm = np.zeros((n_l, n_l))
    for l in range(n_l):
        for m in range(l + 1):
            norm[l, m] = sqrt((2 * l + 1) / (4 * pi) * factorial(l - m) / factorial(l + m))
            if m > 0:
                norm[l, m] *= sqrt(2.0)
    dfact = np.array([float(np.prod(np.arange(2 * m - 1, 0, -2))) if m > 0 else 1.0
                      for m in range(n_l)])
    recur = np.zeros((2, n_l, n_l))
    for l in range(n_l):
        for m in range(l):
            recur[0, l, m] = (2 * l - 1) / (l - m)
            recur[1, l, m] = (l + m - 1) / (l - m)
    return norm, dfact, recur


def _kernel():
    """The compiled frame loop (built on first use, cached on disk by numba)."""

    @numba.njit(cache=True, fastmath=True, nogil=True)
    def frames_soap(positions, species_start, atom_order, centres, shifts, cutoff2, inv_step,
                    step, table, slope, norm, dfact, recur, f_index, f_scale, normalise, out):
        n_frames = positions.shape[0]
        n_l, n_max = table.shape[1], table.shape[2]
        n_species = species_start.shape[0] - 1
        n_lm = n_l * n_l
        width = n_species * n_max
        n_centres = centres.shape[0]
        n_grid = table.shape[0]
        n_shifts = shifts.shape[1]
        capacity = atom_order.shape[0] * n_shifts
        coeff = np.empty((n_lm, width))
        gram = np.empty((n_l, width, width))
        # the neighbours of one centre and one species, p contiguous
        dx = np.empty(capacity)
        dy = np.empty(capacity)
        dz = np.empty(capacity)
        rr = np.empty(capacity)
        radial = np.empty((n_l, n_max, capacity))
        y = np.empty((n_lm, capacity))
        legendre = np.empty((3, capacity))
        cos_m = np.empty((n_l, capacity))
        sin_m = np.empty((n_l, capacity))
        for f in range(n_frames):
            for ci in range(n_centres):
                centre = centres[ci]
                cx = positions[f, centre, 0]
                cy = positions[f, centre, 1]
                cz = positions[f, centre, 2]
                for s in range(n_species):
                    # neighbours of species s (every periodic image within the cutoff)
                    count = 0
                    for index in range(species_start[s], species_start[s + 1]):
                        j = atom_order[index]
                        px = positions[f, j, 0] - cx
                        py = positions[f, j, 1] - cy
                        pz = positions[f, j, 2] - cz
                        for t in range(n_shifts):
                            ex = px + shifts[f, t, 0]
                            ey = py + shifts[f, t, 1]
                            ez = pz + shifts[f, t, 2]
                            r2 = ex * ex + ey * ey + ez * ez
                            if r2 <= cutoff2:
                                dx[count] = ex
                                dy[count] = ey
                                dz[count] = ez
                                rr[count] = np.sqrt(r2)
                                count += 1
                    # radial functions: cubic Hermite interpolation of the table
                    for p in range(count):
                        position = rr[p] * inv_step
                        i = min(int(position), n_grid - 2)
                        u = position - i
                        u2 = u * u
                        h00 = (1.0 + 2.0 * u) * (1.0 - u) * (1.0 - u)
                        h10 = u * (1.0 - u) * (1.0 - u) * step
                        h01 = u2 * (3.0 - 2.0 * u)
                        h11 = u2 * (u - 1.0) * step
                        for l in range(n_l):
                            for n in range(n_max):
                                radial[l, n, p] = (h00 * table[i, l, n] + h10 * slope[i, l, n]
                                                   + h01 * table[i + 1, l, n]
                                                   + h11 * slope[i + 1, l, n])
                    # real orthonormal spherical harmonics of the directions
                    for p in range(count):
                        inverse = 1.0 / rr[p] if rr[p] > 0.0 else 0.0
                        dx[p] *= inverse
                        dy[p] *= inverse
                        dz[p] *= inverse
                        cos_m[0, p] = 1.0
                        sin_m[0, p] = 0.0
                    for m in range(1, n_l):
                        for p in range(count):
                            cos_m[m, p] = dx[p] * cos_m[m - 1, p] - dy[p] * sin_m[m - 1, p]
                            sin_m[m, p] = dx[p] * sin_m[m - 1, p] + dy[p] * cos_m[m - 1, p]
                    for m in range(n_l):
                        for l in range(m, n_l):
                            a_lm, b_lm = recur[0, l, m], recur[1, l, m]
                            for p in range(count):
                                if l == m:
                                    cur = dfact[m]
                                    legendre[1, p] = cur
                                elif l == m + 1:
                                    cur = (2 * m + 1) * dz[p] * legendre[1, p]
                                    legendre[0, p] = legendre[1, p]
                                    legendre[1, p] = cur
                                else:
                                    cur = a_lm * dz[p] * legendre[1, p] - b_lm * legendre[0, p]
                                    legendre[0, p] = legendre[1, p]
                                    legendre[1, p] = cur
                                if m == 0:
                                    y[l * l + l, p] = norm[l, 0] * cur
                                else:
                                    y[l * l + l + m, p] = norm[l, m] * cur * cos_m[m, p]
                                    y[l * l + l - m, p] = norm[l, m] * cur * sin_m[m, p]
                    # expansion coefficients: dot products over the neighbours
                    offset = s * n_max
                    for l in range(n_l):
                        for lm in range(l * l, (l + 1) * (l + 1)):
                            for n in range(n_max):
                                acc = 0.0
                                for p in range(count):
                                    acc += y[lm, p] * radial[l, n, p]
                                coeff[lm, offset + n] = acc
                # power spectrum: one Gram matrix of all channels per l
                for l in range(n_l):
                    for a in range(width):
                        for b in range(width):
                            gram[l, a, b] = 0.0
                    for lm in range(l * l, (l + 1) * (l + 1)):
                        for a in range(width):
                            ca = coeff[lm, a]
                            for b in range(width):
                                gram[l, a, b] += ca * coeff[lm, b]
                row = f * n_centres + ci
                flat = gram.reshape(-1)
                total = 0.0
                for k in range(f_index.shape[0]):
                    value = flat[f_index[k]] * f_scale[k]
                    out[row, k] = value
                    total += value * value
                if normalise and total > 0.0:
                    inverse = 1.0 / np.sqrt(total)
                    for k in range(f_index.shape[0]):
                        out[row, k] *= inverse

    return frames_soap


_KERNEL = None


class NumbaGtoSoap:
    """dscribe's periodic GTO SOAP power spectrum of centre atoms, by a compiled kernel.

    Parameters
    ----------
    soap
        A dscribe ``SOAP`` (rbf ``gto``, periodic, no weighting, compression or averaging):
        the constants are read from it and it is the reference of the construction check.

    Attributes
    ----------
    ok
        Whether the kernel covers these settings and reproduced dscribe's normalised rows
        within :data:`CHECK_ATOL`; when False, use dscribe.
    why
        Why not, when ``ok`` is False.
    """

    def __init__(self, soap):
        self.ok, self.why = False, ""
        if numba is None:
            self.why = "numba is not installed"
            return
        compression = getattr(soap, "compression", {}) or {}
        if (soap._rbf != "gto" or not soap.periodic or soap._weighting
                or compression.get("mode", "off") != "off" or soap.average != "off"
                or np.any(np.asarray(soap._species_weights) != 1)):
            self.why = "only periodic, unweighted, uncompressed, unaveraged GTO SOAP"
            return
        self.l_max, self.n_max = int(soap._l_max), int(soap._n_max)
        self.atomic_numbers = np.asarray(soap._atomic_numbers, dtype=np.int64)
        self.cutoff_a = float(soap._r_cut + soap.get_cutoff_padding())
        self._norm, self._dfact, self._recur = _harmonic_constants(self.l_max)
        self._table, self._slope = self._radial_table(soap)
        self._f_l, self._f_a, self._f_b = self._feature_order()
        self._scale = np.ones(self.l_max + 1)
        global _KERNEL
        if _KERNEL is None:
            _KERNEL = _kernel()
        self._kernel = _KERNEL
        try:
            self._scale = self._calibrate(soap)
            error = self._check(soap)
        except ValueError as exc:
            self.why = str(exc)
            return
        self.ok = error <= CHECK_ATOL
        if not self.ok:
            self.why = f"differs from dscribe by {error:.1e} (> {CHECK_ATOL:.0e})"

    # ---- constants ----------------------------------------------------------------------
    def _radial_table(self, soap) -> tuple[np.ndarray, np.ndarray]:
        """g_ln(r) and dg_ln/dr on the grid 0, step, ... past the cutoff: (n_grid, L, N)."""
        n_l, n_max = self.l_max + 1, self.n_max
        eta = float(soap._eta)
        alphas = np.asarray(soap._alphas, dtype=np.float64).reshape(n_l, n_max)
        betas = np.asarray(soap._betas, dtype=np.float64).reshape(n_l, n_max, n_max)
        one_over = 1.0 / (1.0 + alphas / eta)
        a = -alphas * one_over  # (l, k)
        power = np.sqrt(one_over) * one_over ** (np.arange(n_l)[:, None] + 1)
        b = eta ** -1.5 * betas * power[:, None, :]  # (l, n, k)
        r = np.arange(0.0, self.cutoff_a + 3 * TABLE_STEP_A, TABLE_STEP_A)
        ls = np.arange(n_l)[None, :, None]
        gauss = np.exp(a[None] * (r * r)[:, None, None])  # (r, l, k)
        r_l = r[:, None, None] ** ls
        with np.errstate(divide="ignore", invalid="ignore"):
            r_lm1 = np.where(ls > 0, r[:, None, None] ** np.maximum(ls - 1, 0), 0.0)
        value = r_l * gauss
        derivative = (ls * r_lm1 + 2.0 * a[None] * r[:, None, None] * r_l) * gauss
        table = np.einsum("rlk,lnk->rln", value, b)
        slope = np.einsum("rlk,lnk->rln", derivative, b)
        self._inv_step, self._step = 1.0 / TABLE_STEP_A, TABLE_STEP_A
        return np.ascontiguousarray(table), np.ascontiguousarray(slope)

    def _feature_order(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(l, channel a, channel b) of every dscribe feature: species pairs s <= t, then l,
        then n, n' (n <= n' when s == t), channel = species * n_max + n."""
        n, n_s, n_l = self.n_max, len(self.atomic_numbers), self.l_max + 1
        f_l, f_a, f_b = [], [], []
        for s in range(n_s):
            for t in range(s, n_s):
                for l in range(n_l):
                    for k in range(n):
                        for kd in range(k if s == t else 0, n):
                            f_l.append(l)
                            f_a.append(s * n + k)
                            f_b.append(t * n + kd)
        return (np.asarray(f_l, np.int64), np.asarray(f_a, np.int64),
                np.asarray(f_b, np.int64))

    @property
    def n_features(self) -> int:
        """Length of a row (dscribe's)."""
        return len(self._f_l)

    # ---- evaluation ---------------------------------------------------------------------
    def species_index(self, numbers: np.ndarray) -> np.ndarray:
        """Index into the SOAP species of every atom (ValueError for an unknown species)."""
        lookup = {int(z): i for i, z in enumerate(self.atomic_numbers)}
        try:
            return np.array([lookup[int(z)] for z in numbers], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"atomic number {exc.args[0]} is not a SOAP species") from None

    def image_shifts(self, cell_a: np.ndarray) -> np.ndarray:
        """Lattice translations (k, T, 3) that reach every atom within the cutoff of any
        point of the cell: all i, j, k with |i| <= ceil(cutoff / layer height) per axis."""
        volume = np.abs(np.linalg.det(cell_a))
        cross = np.cross(cell_a[:, [1, 2, 0]], cell_a[:, [2, 0, 1]])
        heights = volume[:, None] / np.linalg.norm(cross, axis=-1)
        reach = np.ceil(self.cutoff_a / heights.min(axis=0)).astype(int)
        grid = np.stack(np.meshgrid(*[np.arange(-n, n + 1) for n in reach], indexing="ij"),
                        -1).reshape(-1, 3).astype(np.float64)
        return np.ascontiguousarray(np.einsum("ti,kij->ktj", grid, cell_a))

    def power_spectrum(self, numbers: np.ndarray, positions_a: np.ndarray, cell_a: np.ndarray,
                       centres: np.ndarray, normalise: bool = True,
                       dtype=np.float32) -> np.ndarray:
        """SOAP rows of `centres` of k frames, frame-major: (k * len(centres), n_features).

        Parameters
        ----------
        numbers
            (n_atoms,) atomic numbers (the same in every frame).
        positions_a
            (k, n_atoms, 3) positions (A), INSIDE their cells (wrapped).
        cell_a
            (k, 3, 3) cells (A), rows are the cell vectors.
        centres
            Atom indices of the centres.
        normalise
            Scale every row to unit L2 norm (the NN-NMR input).
        """
        positions_a = np.ascontiguousarray(positions_a, dtype=np.float64)
        cell_a = np.asarray(cell_a, dtype=np.float64)
        out = np.empty((len(positions_a) * len(centres), self.n_features), dtype=dtype)
        width = len(self.atomic_numbers) * self.n_max
        f_index = (self._f_l * width + self._f_a) * width + self._f_b
        species = self.species_index(numbers)
        atom_order = np.argsort(species, kind="stable")
        species_start = np.searchsorted(species[atom_order],
                                        np.arange(len(self.atomic_numbers) + 1))
        self._kernel(positions_a, species_start.astype(np.int64), atom_order.astype(np.int64),
                     np.asarray(centres, dtype=np.int64), self.image_shifts(cell_a),
                     self.cutoff_a ** 2, self._inv_step, self._step, self._table, self._slope,
                     self._norm, self._dfact, self._recur, f_index, self._scale[self._f_l],
                     normalise, out)
        return out

    # ---- agreement with dscribe -----------------------------------------------------------
    def _random_frame(self, seed: int, per_species: int = 6):
        rng = np.random.default_rng(seed)
        numbers = np.repeat(self.atomic_numbers, per_species)
        cell = np.diag([9.0, 9.5, 10.0]) + rng.uniform(-1.0, 1.0, (3, 3))
        positions = rng.uniform(0.0, 1.0, (len(numbers), 3)) @ cell
        centres = np.arange(0, len(numbers), 5)
        return numbers, positions, cell, centres

    @staticmethod
    def _dscribe_rows(soap, numbers, positions, cell, centres) -> np.ndarray:
        from ase import Atoms

        frame = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=True)
        return np.asarray(soap.create(frame, centers=centres.tolist(), n_jobs=1), np.float64)

    def _calibrate(self, soap) -> np.ndarray:
        """dscribe's constant factor of each l (its harmonics' normalisation and prefactor):
        the ratio of its raw features to this kernel's, required to be one number per l."""
        numbers, positions, cell, centres = self._random_frame(0)
        reference = self._dscribe_rows(soap, numbers, positions, cell, centres)
        mine = self.power_spectrum(numbers, positions[None], cell[None], centres,
                                   normalise=False, dtype=np.float64)
        scale = np.ones(self.l_max + 1)
        for l in range(self.l_max + 1):
            block = self._f_l == l
            ref, got = reference[:, block], mine[:, block]
            big = np.abs(got) > 1e-3 * np.abs(got).max()
            ratio = ref[big] / got[big]
            scale[l] = np.median(ratio)
            if not np.all(np.abs(ratio / scale[l] - 1.0) < 1e-6):
                raise ValueError(f"the l = {l} features are not a constant multiple of "
                                 "dscribe's")
        return scale

    def _check(self, soap) -> float:
        """Largest difference from dscribe's normalised rows on another random frame."""
        numbers, positions, cell, centres = self._random_frame(1, per_species=8)
        reference = self._dscribe_rows(soap, numbers, positions, cell, centres)
        reference /= np.linalg.norm(reference, axis=1, keepdims=True)
        mine = self.power_spectrum(numbers, positions[None], cell[None], centres,
                                   dtype=np.float64)
        return float(np.abs(mine - reference).max())
