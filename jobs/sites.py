"""Na sites of a P2-type layered oxide, found from the transition-metal framework of frame 0.

Geometry (P2, e.g. P6_3/mmc and its Mg/Mn-ordered superstructures P6_3/mcm and P6_322): the
transition-metal (TM) layers sit at z = 0 and 1/2 of c with the TMs of both layers at the same
xy; the Na layers at z = 1/4 and 3/4 lie between them, in trigonal prisms of oxygen whose two
O triangles (the top O of the TM layer below and the bottom O of the TM layer above) sit at
the same xy. In the xy plane of one Na layer, the TM lattice is triangular; a prism centre is
either

- on a TM column (a TM directly below and above): the prism shares faces with the MO6
  octahedra of both layers, **Na_f**, named by the TMs below and above (``Na_Mn-Mn``,
  ``Na_Mg-Mg``, ``Na_Mn-Mg``; heavier element first);
- at the centroid of a TM triangle that is NOT covered by the bounding O atoms (the other half
  of the triangles carry the O of the prism faces): the prism shares edges with the
  octahedra, **Na_edge**.

A target nucleus belongs to a site when it is in the site's interlayer slab (between the two
TM layers) and within ``radius_a`` of the site's centre in the xy plane. The framework may
drift as a whole during MD (the published DPMD frames drift by > 1 A over 200 ns), so samples
are compared with the sites after subtracting the framework's mean displacement from frame 0
(:func:`framework_drift_a`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from engine.failure import InputError

ANIONS = ("O", "F", "S", "Se", "Te", "Cl", "Br", "I", "N", "P")
"""Species never counted as framework cations when `framework_species` is not given."""
EDGE = "Na_edge"
"""Class name of the edge-sharing prism sites."""
UNASSIGNED = "unassigned"
"""Class name of samples that are within no site's circle."""
MAX_PAIRS_PER_PASS = 1 << 20
"""Sample-site pairs per vectorised pass of :func:`assign_sites` (bounds its memory)."""


@dataclass(frozen=True)
class SiteSet:
    """The prism sites of every interlayer slab of a cell (frame 0)."""

    centres_frac: np.ndarray
    """(n_sites, 3) fractional coordinates of the site centres (x, y; z: mid-slab)."""
    site_class: np.ndarray
    """(n_sites,) index of each site's class in `class_names`."""
    site_layer: np.ndarray
    """(n_sites,) index of each site's interlayer slab."""
    class_names: tuple[str, ...]
    """Site classes: ``Na_edge`` first, then the face-sharing classes sorted by name, then
    ``unassigned`` (the class of samples in no site)."""
    layer_z_frac: np.ndarray
    """(n_layers,) fractional z of the framework (TM) layers, increasing; slab k lies between
    layer k and layer k + 1 (the last slab wraps to layer 0 + 1)."""
    radius_a: float
    """xy radius of a site (A)."""
    target_species: str
    """The species whose samples are assigned."""

    @property
    def n_classes(self) -> int:
        """Number of classes including ``unassigned``."""
        return len(self.class_names)


@dataclass(frozen=True)
class SiteAssignment:
    """Where each sample (frame x centre) is."""

    site: np.ndarray
    """(n_frames, n_centres) index of the site, -1 when in none."""
    site_class: np.ndarray
    """(n_frames, n_centres) class index (the ``unassigned`` class when in no site)."""
    slab: np.ndarray
    """(n_frames, n_centres) interlayer slab index."""
    frac: np.ndarray
    """(n_frames, n_centres, 3) fractional coordinates in the frame's cell, wrapped to [0, 1),
    after subtracting the framework drift."""


def framework_mask(numbers, target_species: str = "Na",
                   framework_species: list[str] | None = None) -> np.ndarray:
    """Boolean mask of the framework cations among atoms with atomic `numbers`.

    Parameters
    ----------
    numbers
        Atomic numbers of the frame.
    target_species
        The observed species (never framework).
    framework_species
        Symbols of the framework cations; None: all species but the target and `ANIONS`.
    """
    symbols = np.array([chemical_symbols[int(z)] for z in numbers])
    if framework_species is not None:
        mask = np.isin(symbols, list(framework_species))
    else:
        mask = ~np.isin(symbols, [target_species, *ANIONS])
    return mask


def framework_drift_a(positions_a, reference_positions_a, cell_a, mask) -> np.ndarray:
    """Mean displacement (A) of the framework atoms from the reference frame (minimum image).

    Parameters
    ----------
    positions_a
        (n_atoms, 3) or (n_frames, n_atoms, 3) positions (A).
    reference_positions_a
        (n_atoms, 3) positions of frame 0 (A).
    cell_a
        (3, 3) or (n_frames, 3, 3) cell vectors as rows (A).
    mask
        Boolean mask of the framework atoms (:func:`framework_mask`).

    Returns
    -------
    numpy.ndarray
        (3,) or (n_frames, 3): subtract it from the frame's positions to put the frame on
        frame 0's framework.
    """
    positions = np.asarray(positions_a, dtype=float)
    single = positions.ndim == 2
    positions = positions[None] if single else positions
    cells = np.broadcast_to(np.asarray(cell_a, dtype=float), (len(positions), 3, 3))
    delta = positions[:, mask] - np.asarray(reference_positions_a, dtype=float)[mask]
    frac = np.einsum("fai,fij->faj", delta, np.linalg.inv(cells))
    frac -= np.round(frac)
    drift = np.einsum("faj,fjk->fak", frac, cells).mean(axis=1)
    return drift[0] if single else drift


_IMAGES = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=float)
"""In-plane periodic image offsets (fractional a, b)."""


def _minimum_image(delta_frac: np.ndarray) -> np.ndarray:
    return delta_frac - np.round(delta_frac)


def _layers(z_frac: np.ndarray, c_length_a: float, gap_a: float) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """Cluster fractional z (periodic) into layers; returns (layer z, layer of each atom)."""
    z = np.mod(z_frac, 1.0)
    order = np.argsort(z)
    gaps = np.diff(np.concatenate([z[order], [z[order][0] + 1.0]])) * c_length_a
    breaks = np.flatnonzero(gaps > gap_a)
    if len(breaks) == 0:
        raise InputError("frame 0: the framework cations do not form separate layers in z "
                         f"(no gap > analyze.layer_gap_a = {gap_a} A)")
    # start a layer after each break: label atoms by how many breaks precede them
    start = (breaks[-1] + 1) % len(z)
    rolled = np.roll(order, -start)
    rolled_gaps = np.roll(gaps, -start)
    labels = np.empty(len(z), dtype=int)
    layer = 0
    for position, atom in enumerate(rolled):
        labels[atom] = layer
        if rolled_gaps[position] > gap_a:
            layer += 1
    n_layers = layer
    centres = np.empty(n_layers)
    for k in range(n_layers):
        members = z[labels == k]
        angle = np.angle(np.mean(np.exp(2j * np.pi * members)))
        centres[k] = np.mod(angle / (2 * np.pi), 1.0)
    order_layers = np.argsort(centres)
    relabel = np.empty(n_layers, dtype=int)
    relabel[order_layers] = np.arange(n_layers)
    return centres[order_layers], relabel[labels]


def slab_of(z_frac, layer_z_frac: np.ndarray) -> np.ndarray:
    """Interlayer slab index of fractional z values (slab k: from layer k to layer k + 1)."""
    z = np.mod(np.asarray(z_frac, dtype=float), 1.0)
    index = np.searchsorted(layer_z_frac, z, side="right") - 1
    index[index < 0] = len(layer_z_frac) - 1
    return index


def _face_name(below: str, above: str) -> str:
    pair = sorted([below, above], key=lambda s: (-atomic_numbers[s], s))
    return f"{pair[0]}-{pair[1]}"


def _xy_distance(delta_frac_xy, ab: np.ndarray) -> np.ndarray:
    """In-plane distance (A) of fractional xy differences, `ab` the cell's in-plane block: the
    exact minimum image over the 9 nearest images."""
    wrapped = _minimum_image(np.asarray(delta_frac_xy))[..., None, :] + _IMAGES
    return np.linalg.norm(wrapped @ ab, axis=-1).min(axis=-1)


def _face_sites(fw_frac: np.ndarray, fw_symbols: np.ndarray, below: np.ndarray,
                above: np.ndarray, ab: np.ndarray, d_nn: float) -> tuple[np.ndarray, list[str]]:
    """The face-sharing sites of one slab: each framework cation of the layer `below` paired
    with the one of the layer `above` it; fractional xy of the sites and their names.

    Raises InputError when a cation has none above it (not a P2-type stacking)."""
    face_xy, face_names = [], []
    for i in below:
        delta = _minimum_image(fw_frac[above, :2] - fw_frac[i, :2])
        dist = np.linalg.norm(delta @ ab, axis=1)
        j = int(np.argmin(dist))
        if dist[j] > d_nn / 3:
            raise InputError(
                f"frame 0: the {fw_symbols[i]} at fractional {np.round(fw_frac[i], 3)} has "
                f"no framework cation of the next layer above it (nearest {dist[j]:.2f} A "
                "in xy): not a P2-type stacking, sites cannot be found")
        face_xy.append(np.mod(fw_frac[i, :2] + delta[j] / 2, 1.0))
        face_names.append(_face_name(fw_symbols[i], fw_symbols[above[j]]))
    return np.array(face_xy), face_names


def _lattice_triangles(face_xy: np.ndarray, ab: np.ndarray, d_nn: float) -> list[np.ndarray]:
    """Centroids (fractional xy) of the triangles of the lattice of face-sharing sites,
    deduplicated: the candidate edge-sharing sites of a slab."""
    centroids = []
    for i in range(len(face_xy)):
        # vectors (fractional) to every neighbouring column, periodic images included
        vectors = (_minimum_image(face_xy - face_xy[i])[:, None, :] + _IMAGES).reshape(-1, 2)
        length = np.linalg.norm(vectors @ ab, axis=1)
        vectors = vectors[(length > 1e-6) & (length < 1.2 * d_nn)]
        for a_pos in range(len(vectors)):
            for b_pos in range(a_pos + 1, len(vectors)):
                if np.linalg.norm((vectors[b_pos] - vectors[a_pos]) @ ab) < 1.2 * d_nn:
                    centroids.append(np.mod(face_xy[i] + (vectors[a_pos] + vectors[b_pos])
                                            / 3, 1.0))
    unique: list[np.ndarray] = []
    for point in centroids:
        if not unique or _xy_distance(np.array(unique) - point, ab).min() > 0.25 * d_nn:
            unique.append(point)
    return unique


def find_sites(numbers, positions_a, cell_a, target_species: str = "Na",
               framework_species: list[str] | None = None, radius_a: float = 0.8,
               layer_gap_a: float = 1.0) -> SiteSet:
    """Find the Na_f and Na_edge prism sites of every interlayer slab of frame 0.

    Parameters
    ----------
    numbers
        (n_atoms,) atomic numbers of frame 0.
    positions_a
        (n_atoms, 3) positions of frame 0 (A).
    cell_a
        (3, 3) cell vectors as rows (A); c must be the stacking axis (a, b in the xy plane).
    target_species
        The observed species (excluded from the framework).
    framework_species
        Symbols of the TM-layer cations; None: all but the target and `ANIONS`.
    radius_a
        xy radius of a site (A).
    layer_gap_a
        Framework cations closer than this in z (A) form one layer.

    Returns
    -------
    SiteSet

    Raises
    ------
    InputError
        When the framework does not form layers, or a TM of one layer has no TM of the next
        layer above it (not a P2-type stacking).
    """
    numbers = np.asarray(numbers)
    positions = np.asarray(positions_a, dtype=float)
    cell = np.asarray(cell_a, dtype=float)
    symbols = np.array([chemical_symbols[int(z)] for z in numbers])
    mask = framework_mask(numbers, target_species, framework_species)
    if mask.sum() < 3:
        raise InputError(f"frame 0: {int(mask.sum())} framework cations found (species "
                         f"{sorted(set(symbols))}); set analyze.framework_species")
    frac = positions @ np.linalg.inv(cell)
    c_length = float(np.linalg.norm(cell[2]))
    layer_z, layer_of = _layers(frac[mask, 2], c_length, layer_gap_a)
    n_layers = len(layer_z)
    fw_frac, fw_symbols = frac[mask], symbols[mask]
    ab = cell[:2, :2]

    # nearest-neighbour distance of the TM lattice (in-plane, within one layer)
    first = fw_frac[layer_of == 0, :2]
    pair = _xy_distance(first[:, None, :] - first[None, :, :], ab)
    pair[np.diag_indices_from(pair)] = np.inf
    d_nn = float(np.median(pair.min(axis=1)))

    others = ~mask & (symbols != target_species)
    centres, classes, slabs = [], [], []
    for k in range(n_layers):
        below = np.flatnonzero(layer_of == k)
        above = np.flatnonzero(layer_of == (k + 1) % n_layers)
        face_xy, face_names = _face_sites(fw_frac, fw_symbols, below, above, ab, d_nn)
        unique = _lattice_triangles(face_xy, ab, d_nn)
        # drop the triangles covered by the prism's own O (anions of this slab)
        z_low, z_high = layer_z[k], layer_z[(k + 1) % n_layers] + (1.0 if k == n_layers - 1
                                                                    else 0.0)
        z_others = np.mod(frac[others, 2] - z_low, 1.0)
        bounding = frac[others][(z_others > 0) & (z_others < z_high - z_low), :2]
        edge_xy = [p for p in unique
                   if len(bounding) == 0
                   or _xy_distance(bounding - p, ab).min() > 0.5 * d_nn / np.sqrt(3)]
        z_mid = np.mod(0.5 * (z_low + z_high), 1.0)
        for p, name in [(p, EDGE) for p in edge_xy] + [
                (p, f"Na_{name}") for p, name in zip(face_xy, face_names)]:
            centres.append([p[0], p[1], z_mid])
            classes.append(name)
            slabs.append(k)
    if target_species != "Na":
        classes = [c.replace("Na_", f"{target_species}_", 1) for c in classes]
    edge_name = EDGE if target_species == "Na" else EDGE.replace("Na_", f"{target_species}_")
    face_classes = sorted(set(classes) - {edge_name})
    class_names = ((edge_name,) if edge_name in classes else ()) + tuple(face_classes) + (
        UNASSIGNED,)
    return SiteSet(np.array(centres), np.array([class_names.index(c) for c in classes]),
                   np.array(slabs), class_names, layer_z, float(radius_a), target_species)


def nearest_site_spacing_a(sites: SiteSet, cell_a) -> float:
    """Shortest xy distance between two site centres of one slab (A, minimum image, in
    `cell_a`); inf with fewer than two sites per slab."""
    cell = np.asarray(cell_a, dtype=float)
    best = np.inf
    for layer in np.unique(sites.site_layer):
        frac = sites.centres_frac[sites.site_layer == layer, :2]
        if len(frac) < 2:
            continue
        cart = _minimum_image(frac[:, None, :] - frac[None, :, :]) @ cell[:2, :2]
        dist = np.sqrt(np.einsum("ijk,ijk->ij", cart, cart))
        dist[np.eye(len(frac), dtype=bool)] = np.inf
        best = min(best, float(dist.min()))
    return best


def assign_sites(positions_a, cells_a, sites: SiteSet) -> SiteAssignment:
    """Assign each sample to the nearest site of its slab within the site radius (xy).

    Each sample is compared only with the sites in its own and the neighbouring bins of a
    fractional (a, b) grid per slab (:func:`_neighbour_table`), so the cost per frame is
    O(n_centres); ties go to the lowest site index, as with distances to every site.

    Parameters
    ----------
    positions_a
        (n_frames, n_centres, 3) positions of the target nuclei (A), already corrected for the
        framework drift (wrapped or unwrapped).
    cells_a
        (n_frames, 3, 3) cells (A); the sites' fractional centres are placed in each frame's
        cell.
    sites
        From :func:`find_sites`.
    """
    positions = np.asarray(positions_a, dtype=float)
    cells = np.asarray(cells_a, dtype=float)
    frac = np.mod(np.einsum("fci,fij->fcj", positions, np.linalg.inv(cells)), 1.0)
    slab = slab_of(frac[..., 2], sites.layer_z_frac)
    n_frames, n_centres = slab.shape
    site = np.full((n_frames, n_centres), -1, dtype=np.int64)
    n_sites = len(sites.centres_frac)
    if n_frames and n_sites:
        bins = _bins_per_axis(cells, sites)
        table = _neighbour_table(sites, bins)
        # frames per pass so that the (frames, centres, candidates) arrays stay ~16 MB
        step = max(1, MAX_PAIRS_PER_PASS // max(1, n_centres * table.shape[1]))
        for start in range(0, n_frames, step):
            rows = slice(start, start + step)
            site[rows] = _nearest_candidate(frac[rows], slab[rows], cells[rows], sites, bins,
                                            table)
    site_class = np.where(site >= 0, sites.site_class[np.maximum(site, 0)]
                          if n_sites else 0, sites.n_classes - 1)
    return SiteAssignment(site, site_class, slab, frac)


_REACH_MARGIN = 1e-6
"""Relative widening of a site's fractional reach (rounding never drops a site in range)."""


def _bins_per_axis(cells: np.ndarray, sites: SiteSet) -> tuple[int, int]:
    """Bins of the fractional grid along a and b, each no narrower than a site circle's reach.

    A disc of radius r in the xy plane spans r |b| / area along fractional a and r |a| / area
    along b (r over the height between the lines of the other axis; area = |a x b|, xy parts
    of each frame's cell, as the distances use). The widest reach over the frames sets the
    bins, so a site within r of a sample lies in the sample's bin or a neighbouring one. More
    bins than ~2 sqrt(sites) per axis buy nothing and are capped.
    """
    ab = cells[:, :2, :2]
    area = np.abs(ab[:, 0, 0] * ab[:, 1, 1] - ab[:, 0, 1] * ab[:, 1, 0])
    lengths = np.linalg.norm(ab, axis=2)  # (n_frames, 2): |a|, |b| in xy
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        reach = (sites.radius_a * lengths[:, ::-1] / area[:, None]).max(axis=0)
        reach = reach * (1.0 + _REACH_MARGIN) + 1e-12
        per_axis = np.floor(1.0 / reach)
    cap = max(1, int(2 * np.sqrt(len(sites.centres_frac))))
    bins = [int(min(n, cap)) if np.isfinite(n) and n >= 1 else 1 for n in per_axis]
    return bins[0], bins[1]


def _bin_keys(frac_xy: np.ndarray, layer: np.ndarray, bins: tuple[int, int]) -> np.ndarray:
    """Flat key (layer, bin along a, bin along b) of fractional xy (any real; NaN: bin 0)."""
    n_a, n_b = bins
    wrapped = np.nan_to_num(np.mod(frac_xy, 1.0), nan=0.0)
    index_a = np.floor(wrapped[..., 0] * n_a).astype(np.int64) % n_a
    index_b = np.floor(wrapped[..., 1] * n_b).astype(np.int64) % n_b
    return (layer * n_a + index_a) * n_b + index_b


def _neighbour_table(sites: SiteSet, bins: tuple[int, int]) -> np.ndarray:
    """Sites of each bin's 3 x 3 neighbourhood (periodic, same slab), ascending, -1 padded.

    Returns
    -------
    numpy.ndarray
        (n_slabs * n_a * n_b, width) site indices; row :func:`_bin_keys` of a sample lists
        every site of its slab whose circle can reach it. With fewer than 3 bins along an
        axis the neighbourhood spans the whole axis.
    """
    n_a, n_b = bins
    n_slabs = len(sites.layer_z_frac)
    layer = np.asarray(sites.site_layer)
    ids = np.flatnonzero((layer >= 0) & (layer < n_slabs))
    home = _bin_keys(sites.centres_frac[ids, :2], np.zeros(len(ids), dtype=np.int64), bins)
    home_a, home_b = home // n_b, home % n_b
    step_a = np.arange(-1, 2) if n_a >= 3 else np.arange(n_a)
    step_b = np.arange(-1, 2) if n_b >= 3 else np.arange(n_b)
    near_a = (home_a[:, None, None] + step_a[None, :, None]) % n_a
    near_b = (home_b[:, None, None] + step_b[None, None, :]) % n_b
    keys = (layer[ids][:, None, None] * n_a + near_a) * n_b + near_b
    members = np.broadcast_to(ids[:, None, None], keys.shape).ravel()
    keys = keys.ravel()
    order = np.lexsort((members, keys))
    keys, members = keys[order], members[order]
    n_bins = n_slabs * n_a * n_b
    counts = np.bincount(keys, minlength=n_bins)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    table = np.full((n_bins, max(1, int(counts.max(initial=0)))), -1, dtype=np.int64)
    table[keys, np.arange(len(keys)) - first[keys]] = members
    return table


def _nearest_candidate(frac, slab, cells, sites: SiteSet, bins, table) -> np.ndarray:
    """(n_frames, n_centres) nearest site within the radius among the candidates, or -1.

    Distances are computed as in :func:`_assign_sites_brute` (same operations, same order),
    so they are the same numbers; candidates ascend in site index, so ties go the same way.
    """
    candidates = table[_bin_keys(frac[..., :2], slab, bins)]  # (frames, centres, width)
    delta = _minimum_image(frac[:, :, None, :2]
                           - sites.centres_frac[np.maximum(candidates, 0), :2])
    cart = np.einsum("fcsi,fij->fcsj", delta, cells[:, :2, :2])
    dist_sq = np.einsum("fcsj,fcsj->fcs", cart, cart)
    dist_sq[candidates < 0] = np.inf
    nearest = np.argmin(dist_sq, axis=2)
    best = np.take_along_axis(dist_sq, nearest[..., None], axis=2)[..., 0]
    chosen = np.take_along_axis(candidates, nearest[..., None], axis=2)[..., 0]
    return np.where(best <= sites.radius_a ** 2, chosen, -1)


def _assign_sites_brute(positions_a, cells_a, sites: SiteSet) -> SiteAssignment:
    """Reference for :func:`assign_sites` (same parameters and results): the distance from
    every sample to every site of the cell, O(n_centres x n_sites) per frame."""
    positions = np.asarray(positions_a, dtype=float)
    cells = np.asarray(cells_a, dtype=float)
    frac = np.mod(np.einsum("fci,fij->fcj", positions, np.linalg.inv(cells)), 1.0)
    slab = slab_of(frac[..., 2], sites.layer_z_frac)
    n_frames, n_centres = slab.shape
    site = np.full((n_frames, n_centres), -1, dtype=np.int64)
    n_sites = len(sites.centres_frac)
    # frames per pass so that the (frames, centres, sites) distance arrays stay ~16 MB
    step = max(1, MAX_PAIRS_PER_PASS // max(1, n_centres * n_sites))
    for start in range(0, n_frames if n_sites else 0, step):
        rows = slice(start, start + step)
        delta = _minimum_image(frac[rows, :, None, :2] - sites.centres_frac[None, None, :, :2])
        cart = np.einsum("fcsi,fij->fcsj", delta, cells[rows, :2, :2])
        dist_sq = np.einsum("fcsj,fcsj->fcs", cart, cart)
        dist_sq[slab[rows, :, None] != sites.site_layer[None, None, :]] = np.inf
        nearest = np.argmin(dist_sq, axis=2)
        best = np.take_along_axis(dist_sq, nearest[..., None], axis=2)[..., 0]
        site[rows] = np.where(best <= sites.radius_a ** 2, nearest, -1)
    site_class = np.where(site >= 0, sites.site_class[np.maximum(site, 0)]
                          if n_sites else 0, sites.n_classes - 1)
    return SiteAssignment(site, site_class, slab, frac)
