"""SOAP features of the target nuclei (Na) of a frame: dscribe's SOAP, rows L2-normalised.

The NN-NMR model of Lin et al. (Chem. Sci. 2022) reads quippy's normalised SOAP power
spectrum of every Na; here dscribe's SOAP (GTO radial basis) of the centre species, each row
scaled to unit Euclidean norm, in float32. Rows are frame-major: frame 0's centres first, in
atom order.

One featurizer is built per rank (``n_jobs=1``: a rank owns its cores, no nested pools).

Kernels: ``features`` (training frames) always calls dscribe; ``features_arrays`` (the infer
stage's dense frames) uses the compiled kernel of :mod:`jobs.shiftmodels.soap_numba` when ``kernel`` is
``auto`` or ``numba`` and that kernel reproduced dscribe's rows at construction (~3x faster per
frame; ``auto`` falls back to dscribe with a warning, ``numba`` raises).

Speed: dscribe computes in float32 (``dtype="float32"``: its C++ GTO expansion runs in single
precision, ~25 % faster than float64; the normalised rows differ from float64 ones by < 1e-7,
tested to 1e-5). Frames given as arrays are wrapped into their cells in one vectorised step.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers

from engine.failure import InputError

SOAP_BACKEND = "dscribe-soap-gto"
"""Name stored with the settings: which SOAP implementation and radial basis made features."""


SOAP_DTYPE = "float32"
"""Precision dscribe computes in (float32: as exact as the float32 rows returned, faster)."""


class SoapFeaturizer:
    """Normalised SOAP power spectra of the `centre` atoms of frames.

    Parameters
    ----------
    species
        Every chemical species the frames may contain (e.g. ``["Na", "Mg", "Mn", "O"]``).
    centre
        Species of the SOAP centres (the observed nucleus).
    r_cut_a
        Cutoff radius (A).
    sigma_a
        Width of the Gaussian atomic densities (A).
    n_max
        Number of radial basis functions.
    l_max
        Maximum degree of the spherical harmonics.
    periodic
        Whether the frames are periodic (their cells are used).
    kernel
        ``dscribe``, ``numba`` or ``auto``: who computes :meth:`features_arrays` (above).
    """

    def __init__(self, species: Sequence[str], centre: str = "Na", r_cut_a: float = 5.5,
                 sigma_a: float = 0.5, n_max: int = 9, l_max: int = 9, periodic: bool = True,
                 kernel: str = "dscribe"):
        from dscribe.descriptors import SOAP

        unknown = [s for s in [*species, centre] if s not in atomic_numbers]
        if unknown:
            raise InputError(f"SOAP: unknown chemical species {unknown}")
        if centre not in species:
            raise InputError(f"SOAP: centre species {centre!r} is not in species {list(species)}")
        self.species = list(species)
        self.centre = centre
        self.r_cut_a = float(r_cut_a)
        self.sigma_a = float(sigma_a)
        self.n_max = int(n_max)
        self.l_max = int(l_max)
        self.periodic = bool(periodic)
        self._soap = SOAP(species=self.species, r_cut=self.r_cut_a, n_max=self.n_max,
                          l_max=self.l_max, sigma=self.sigma_a, rbf="gto",
                          periodic=self.periodic, sparse=False, dtype=SOAP_DTYPE)
        self._species_numbers = {atomic_numbers[s] for s in self.species}
        self._centre_number = atomic_numbers[centre]
        if kernel not in ("dscribe", "numba", "auto"):
            raise InputError(f"SOAP kernel {kernel!r}: use dscribe, numba or auto")
        self.kernel = kernel
        self._fast = None  # the compiled kernel, built on first use

    def array_kernel(self) -> str:
        """Who computes :meth:`features_arrays`: ``numba`` or ``dscribe`` (builds and checks
        the compiled kernel on the first call)."""
        if self.kernel == "dscribe":
            return "dscribe"
        if self._fast is None:
            from jobs.shiftmodels.soap_numba import NumbaGtoSoap

            self._fast = NumbaGtoSoap(self._soap)
            if not self._fast.ok:
                if self.kernel == "numba":
                    raise InputError(f"SOAP kernel numba: {self._fast.why}")
                import warnings

                warnings.warn(f"SOAP: the compiled kernel is off ({self._fast.why}); using "
                              "dscribe", stacklevel=2)
        return "numba" if self._fast.ok else "dscribe"

    # ---- settings ----------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        """Length of one feature row (6660 for Na/Mg/Mn/O, n_max = l_max = 9)."""
        return int(self._soap.get_number_of_features())

    def settings(self) -> dict:
        """Everything that defines the features, as plain JSON-able values (store it)."""
        return {"backend": SOAP_BACKEND, "species": list(self.species), "centre": self.centre,
                "r_cut_a": self.r_cut_a, "sigma_a": self.sigma_a, "n_max": self.n_max,
                "l_max": self.l_max, "periodic": self.periodic, "normalised": "l2",
                "n_features": self.n_features}

    @classmethod
    def from_settings(cls, settings: dict, kernel: str = "dscribe") -> "SoapFeaturizer":
        """Rebuild the featurizer that `settings()` described.

        Raises
        ------
        InputError
            When the settings name another SOAP backend or miss a key.
        """
        backend = settings.get("backend", SOAP_BACKEND)
        if backend != SOAP_BACKEND:
            raise InputError(f"SOAP settings of backend {backend!r}; this build computes "
                             f"{SOAP_BACKEND!r}")
        try:
            featurizer = cls(settings["species"], settings.get("centre", "Na"),
                             settings["r_cut_a"], settings["sigma_a"], settings["n_max"],
                             settings["l_max"], settings.get("periodic", True), kernel)
        except KeyError as exc:
            raise InputError(f"SOAP settings lack {exc.args[0]!r}: {settings}") from None
        expected = settings.get("n_features")
        if expected is not None and int(expected) != featurizer.n_features:
            raise InputError(f"SOAP settings say {expected} features, the rebuilt featurizer "
                             f"has {featurizer.n_features}")
        return featurizer

    # ---- features -----------------------------------------------------------------------
    def centre_indices(self, frame: Atoms) -> np.ndarray:
        """Atom indices of the centre species in `frame`, in atom order."""
        return np.flatnonzero(frame.numbers == self._centre_number)

    def check_frame(self, frame: Atoms, where: str = "frame") -> None:
        """Raise InputError when `frame` holds a species this featurizer does not know."""
        extra = set(np.unique(frame.numbers).tolist()) - self._species_numbers
        if extra:
            from ase.data import chemical_symbols

            names = sorted(chemical_symbols[z] for z in extra)
            raise InputError(f"{where}: species {names} not among the SOAP species "
                             f"{self.species}")

    def features(self, frames: Sequence[Atoms]) -> np.ndarray:
        """Normalised SOAP rows of the centre atoms of every frame.

        Parameters
        ----------
        frames
            The frames; for periodic SOAP each needs a cell. Positions may be unwrapped.

        Returns
        -------
        numpy.ndarray
            float32, shape ``(sum of centres over frames, n_features)``, frame-major (frame 0's
            centres first, in atom order), every row of unit L2 norm.
        """
        centres_of = [self.centre_indices(frame) for frame in frames]
        out = np.empty((sum(len(c) for c in centres_of), self.n_features), np.float32)
        row = 0
        for index, (frame, centres) in enumerate(zip(frames, centres_of)):
            self.check_frame(frame, f"frame {index}")
            if len(centres) == 0:
                continue
            if self.periodic:
                frame = wrapped(frame)
            rows = self._soap.create(frame, centers=centres.tolist(), n_jobs=1)
            out[row:row + len(centres)] = normalise_rows(rows)
            row += len(centres)
        return out

    def features_arrays(self, numbers: np.ndarray, positions_a: np.ndarray,
                        cell_a: np.ndarray) -> np.ndarray:
        """As :meth:`features`, for frames given as arrays (the infer stage's fast path).

        Parameters
        ----------
        numbers
            (n_atoms,) atomic numbers, the same in every frame.
        positions_a
            (n_frames, n_atoms, 3) positions (A), wrapped or not.
        cell_a
            (n_frames, 3, 3) cells (A), rows are the cell vectors.
        """
        numbers = np.asarray(numbers)
        frame = Atoms(numbers=numbers, pbc=self.periodic)
        self.check_frame(frame, "frames")
        centres = self.centre_indices(frame)
        n_frames = len(positions_a)
        out = np.empty((n_frames * len(centres), self.n_features), np.float32)
        if len(centres) == 0:
            return out
        positions_a = np.asarray(positions_a, dtype=np.float64)
        cell_a = np.asarray(cell_a, dtype=np.float64)
        if self.periodic:
            positions_a = wrapped_positions(positions_a, cell_a)
        if self.array_kernel() == "numba":
            return self._fast.power_spectrum(numbers, positions_a, cell_a, centres)
        centre_list = centres.tolist()
        n_c = len(centres)
        for index in range(n_frames):
            frame = Atoms(numbers=numbers, positions=positions_a[index], cell=cell_a[index],
                          pbc=self.periodic)
            rows = self._soap.create(frame, centers=centre_list, n_jobs=1)
            out[index * n_c:(index + 1) * n_c] = normalise_rows(rows)
        return out


def wrapped_positions(positions_a: np.ndarray, cell_a: np.ndarray) -> np.ndarray:
    """Positions (k, n_atoms, 3) moved into their cells (k, 3, 3): fractional coordinates
    taken modulo 1, as ``ase.Atoms.wrap(eps=0)`` does, for many frames at once."""
    fractional = np.linalg.solve(np.swapaxes(cell_a, 1, 2),
                                 np.swapaxes(positions_a, 1, 2))  # (k, 3, n_atoms)
    fractional %= 1.0
    return np.einsum("kia,kij->kaj", fractional, cell_a)


def wrapped(frame: Atoms) -> Atoms:
    """A copy of `frame` with every atom moved into its cell (dscribe's periodic SOAP only
    extends the cell by the cutoff, so an unwrapped atom far outside would be missed)."""
    frame = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=True)
    frame.wrap(eps=0.0)
    return frame


def normalise_rows(rows: np.ndarray) -> np.ndarray:
    """Scale every row of `rows` to unit Euclidean norm (a zero row stays zero), float32."""
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)
