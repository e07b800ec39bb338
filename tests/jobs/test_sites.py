"""Sites from the framework of frame 0: ideal P2 cells, drift, real frames."""
from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.geometry import cellpar_to_cell

from engine.failure import InputError
from jobs.sites import (EDGE, UNASSIGNED, assign_sites, find_sites, framework_drift_a,
                        framework_mask)

A_TM, C_A, Z_O = 2.89, 11.2, 0.09


def ideal_p2(repeat=(3, 3, 1), mg_at=(), shift_upper_layer=(0.0, 0.0)) -> Atoms:
    """Ideal P6_3/mmc P2 cell (TM 2a, O 4f, one Na_f at 2b z=1/4 and one Na_e at 2d z=3/4),
    repeated; TMs with index in `mg_at` become Mg; the z = 1/2 TM layer may be shifted."""
    sx, sy = shift_upper_layer
    frac = [("Mn", (0, 0, 0)), ("Mn", (sx, sy, 0.5)),
            ("O", (1 / 3, 2 / 3, Z_O)), ("O", (2 / 3, 1 / 3, 0.5 + Z_O)),
            ("O", (2 / 3, 1 / 3, -Z_O)), ("O", (1 / 3, 2 / 3, 0.5 - Z_O)),
            ("Na", (0, 0, 0.25)), ("Na", (1 / 3, 2 / 3, 0.75))]
    cell = cellpar_to_cell([A_TM, A_TM, C_A, 90, 90, 120])
    atoms = Atoms([s for s, _ in frac], scaled_positions=[p for _, p in frac], cell=cell,
                  pbc=True).repeat(repeat)
    symbols = atoms.get_chemical_symbols()
    tm = [i for i, s in enumerate(symbols) if s == "Mn"]
    for k in mg_at:
        symbols[tm[k]] = "Mg"
    atoms.set_chemical_symbols(symbols)
    return atoms


def test_ideal_p2_has_one_face_and_one_edge_site_per_tm_column_and_slab():
    atoms = ideal_p2()
    sites = find_sites(atoms.numbers, atoms.positions, atoms.cell[:])
    assert sites.class_names == (EDGE, "Na_Mn-Mn", UNASSIGNED)
    assert len(sites.layer_z_frac) == 2
    # 9 TM columns per slab: 9 face sites and 9 uncovered triangles per slab
    assert np.bincount(sites.site_class).tolist() == [18, 18]
    assert np.bincount(sites.site_layer).tolist() == [18, 18]
    na = atoms.numbers == 11
    where = assign_sites(atoms.positions[na][None], atoms.cell[:][None], sites)
    # the Na at 2b (z = 1/4, over a TM) are face-sharing; those at 2d (z = 3/4) edge-sharing
    z = atoms.get_scaled_positions()[na, 2]
    assert np.all(where.site_class[0][np.isclose(z, 0.25)] == 1)
    assert np.all(where.site_class[0][np.isclose(z, 0.75)] == 0)


def test_the_edge_site_is_the_triangle_without_the_prism_oxygens():
    """In the z = 1/4 slab the O of both prism faces sit at (1/3, 2/3): Na_e is (2/3, 1/3)."""
    atoms = ideal_p2(repeat=(2, 2, 1))
    sites = find_sites(atoms.numbers, atoms.positions, atoms.cell[:])
    low_slab = sites.layer_z_frac.argmin()
    edge = sites.centres_frac[(sites.site_class == 0) & (sites.site_layer == low_slab)]
    primitive = np.mod(edge[:, :2] * 2, 1.0)  # in units of the primitive cell
    assert np.allclose(primitive, [2 / 3, 1 / 3], atol=1e-6)
    assert np.allclose(edge[:, 2], 0.25, atol=1e-6)


def test_face_sites_are_named_by_the_cations_below_and_above():
    # TM index order of the repeat: 2 per primitive cell (z = 0, then z = 1/2)
    atoms = ideal_p2(repeat=(3, 3, 1), mg_at=(0, 1, 2))
    sites = find_sites(atoms.numbers, atoms.positions, atoms.cell[:])
    assert sites.class_names == (EDGE, "Na_Mg-Mg", "Na_Mn-Mg", "Na_Mn-Mn", UNASSIGNED)
    counts = np.bincount(sites.site_class, minlength=4)
    # column 0: Mg over Mg (in both slabs); TM 2 (z = 0 of cell 1) is Mg under a Mn
    assert counts.tolist() == [18, 2, 2, 14]


def test_radius_and_slab_decide_membership():
    atoms = ideal_p2()
    sites = find_sites(atoms.numbers, atoms.positions, atoms.cell[:], radius_a=0.8)
    na = np.flatnonzero(atoms.numbers == 11)[:1]  # at (0, 0, 1/4): a face site
    base = atoms.positions[na]
    probes = np.concatenate([base + [0.79, 0, 0], base + [0, 0.81, 0], base + [0, 0, 0.3]])
    where = assign_sites(probes[None], atoms.cell[:][None], sites)
    assert where.site_class[0].tolist() == [1, 2, 1]
    # a Na moved to the other slab (z = 3/4) over the same column is also Na_f there
    other = base + [0, 0, C_A / 2]
    assert assign_sites(other[None], atoms.cell[:][None], sites).slab[0, 0] != where.slab[0, 0]


def test_framework_drift_is_removed_before_assignment():
    atoms = ideal_p2()
    sites = find_sites(atoms.numbers, atoms.positions, atoms.cell[:])
    mask = framework_mask(atoms.numbers)
    assert mask.sum() == 18
    moved = atoms.positions + [1.2, -0.4, 0.05]
    drift = framework_drift_a(moved, atoms.positions, atoms.cell[:], mask)
    assert np.allclose(drift, [1.2, -0.4, 0.05])
    na = atoms.numbers == 11
    raw = assign_sites(moved[na][None], atoms.cell[:][None], sites)
    fixed = assign_sites((moved[na] - drift)[None], atoms.cell[:][None], sites)
    assert np.all(raw.site == -1)
    assert np.all(fixed.site >= 0)
    batch = framework_drift_a(np.stack([atoms.positions, moved]), atoms.positions,
                              atoms.cell[:], mask)
    assert np.allclose(batch, [[0, 0, 0], [1.2, -0.4, 0.05]])


def test_a_stacking_without_tm_columns_is_an_input_error():
    atoms = ideal_p2(shift_upper_layer=(1 / 3, 2 / 3))  # O3-like: upper TMs over triangles
    with pytest.raises(InputError, match="no framework cation of the next layer"):
        find_sites(atoms.numbers, atoms.positions, atoms.cell[:])


def test_sites_of_the_shared_frames(shared_data):
    import ase.io

    for name, faces in (("p63mcm", {"Na_Mg-Mg": 8, "Na_Mn-Mn": 16}),
                        ("p6322", {"Na_Mn-Mg": 16, "Na_Mn-Mn": 8})):
        atoms = ase.io.read(shared_data / f"{name}-dev.extxyz", 0)
        sites = find_sites(atoms.numbers, atoms.positions, atoms.cell[:])
        counts = dict(zip(sites.class_names, np.bincount(sites.site_class,
                                                         minlength=sites.n_classes)))
        assert counts == {EDGE: 24, **faces, UNASSIGNED: 0}
        assert np.allclose(sorted(np.mod(sites.layer_z_frac + 0.1, 0.5)), 0.1, atol=0.02)


def test_assignment_in_small_passes_is_the_same(monkeypatch, shared_data):
    import ase.io

    import jobs.sites

    frames = ase.io.read(shared_data / "p6322-dev.extxyz", ":30")
    first = frames[0]
    sites = find_sites(first.numbers, first.positions, first.cell[:])
    na = first.numbers == 11
    positions = np.array([a.positions[na] for a in frames])
    cells = np.array([a.cell[:] for a in frames])
    whole = assign_sites(positions, cells, sites)
    monkeypatch.setattr(jobs.sites, "MAX_PAIRS_PER_PASS", 1000)  # 1 frame per pass
    parts = assign_sites(positions, cells, sites)
    assert np.array_equal(whole.site, parts.site)
    assert np.array_equal(whole.site_class, parts.site_class)
    assert (whole.site >= 0).mean() > 0.5


# ---- the binned neighbour search of assign_sites against the all-pairs reference -------------

def _strained_cells(cell, n_frames, rng, strain=0.04):
    """`n_frames` cells: `cell` sheared and stretched in xy (a different cell each frame)."""
    cells = []
    for _ in range(n_frames):
        deform = np.eye(3)
        deform[:2, :2] += rng.uniform(-strain, strain, (2, 2))
        deform[2, 2] += rng.uniform(-strain, strain)
        cells.append(np.asarray(cell) @ deform)
    return np.array(cells)


def _assert_same(new, reference):
    for name in ("site", "site_class", "slab", "frac"):
        assert np.array_equal(getattr(new, name), getattr(reference, name),
                              equal_nan=name == "frac"), name


_P2_SITES = {}


def _p2_supercell(repeat):
    """The shipped 88-atom P6_3/mcm cell repeated, and its sites (found once per repeat)."""
    from jobs.structures import p2_cell

    if repeat not in _P2_SITES:
        atoms = p2_cell("nmmo", "p63mcm").repeat(repeat)
        _P2_SITES[repeat] = atoms, find_sites(atoms.numbers, atoms.positions, atoms.cell[:])
    return _P2_SITES[repeat]


@pytest.mark.parametrize("repeat", [(1, 1, 1), (2, 2, 1), (4, 4, 4)])
def test_binned_search_equals_all_pairs_on_random_samples_in_strained_cells(repeat):
    from jobs.sites import _assign_sites_brute

    atoms, sites = _p2_supercell(repeat)
    rng = np.random.default_rng(sum(repeat))
    na = atoms.numbers == 11
    n_frames = 6 if repeat == (4, 4, 4) else 40
    cells = _strained_cells(atoms.cell[:], n_frames, rng)
    # uniform in the cell, then near the Na of frame 0 (most inside a site), unwrapped
    frac = rng.random((n_frames, na.sum(), 3)) + rng.integers(-2, 3, (n_frames, 1, 3))
    positions = np.einsum("fci,fij->fcj", frac, cells)
    positions[n_frames // 2:] = (atoms.get_scaled_positions()[na] @ cells[n_frames // 2:]
                                 + rng.normal(0, 0.4, (n_frames - n_frames // 2, na.sum(), 3)))
    new = assign_sites(positions, cells, sites)
    _assert_same(new, _assign_sites_brute(positions, cells, sites))
    assert 0.3 < (new.site >= 0).mean() < 0.9  # both inside and outside the circles


@pytest.mark.parametrize("radius_a", [0.3, 0.8, 1.5, 3.0, 6.0])
def test_binned_search_equals_all_pairs_for_any_radius(radius_a, monkeypatch):
    """Large radii leave fewer than 3 bins along an axis (the whole axis is searched); small
    passes (1 frame each) change nothing."""
    import dataclasses

    import jobs.sites
    from jobs.sites import _assign_sites_brute

    atoms, sites = _p2_supercell((2, 2, 1))
    sites = dataclasses.replace(sites, radius_a=radius_a)
    rng = np.random.default_rng(7)
    cells = _strained_cells(atoms.cell[:], 12, rng, strain=0.1)
    positions = np.einsum("fci,fij->fcj", rng.random((12, 64, 3)), cells)
    reference = _assign_sites_brute(positions, cells, sites)
    _assert_same(assign_sites(positions, cells, sites), reference)
    monkeypatch.setattr(jobs.sites, "MAX_PAIRS_PER_PASS", 100)
    _assert_same(assign_sites(positions, cells, sites), reference)


def test_samples_at_the_radius_are_found_in_the_neighbouring_bins():
    """Samples just inside / outside the circle of every site, in the directions of widest
    fractional reach (perpendicular to a, to b) and at random angles, in stretched cells."""
    from jobs.sites import _assign_sites_brute

    atoms, sites = _p2_supercell((2, 2, 1))
    rng = np.random.default_rng(3)
    cells = _strained_cells(atoms.cell[:], 4, rng)
    cells[:, 0, :2] *= 1.08  # a longer than b
    n_sites = len(sites.centres_frac)
    for factor, inside in ((1 - 1e-7, True), (1 + 1e-7, False)):
        frac, expected = [], []
        for cell in cells:
            ab = cell[:2, :2]
            normals = np.linalg.inv(ab).T  # rows: directions of steepest fractional a, b
            angles = rng.uniform(0, 2 * np.pi, 6)
            directions = np.concatenate([normals, -normals,
                                         np.stack([np.cos(angles), np.sin(angles)], 1)])
            directions /= np.linalg.norm(directions, axis=1, keepdims=True)
            step_xy = factor * sites.radius_a * directions @ np.linalg.inv(ab)  # fractional
            one = np.repeat(sites.centres_frac, len(directions), axis=0)
            one[:, :2] += np.tile(step_xy, (n_sites, 1))
            frac.append(one)
            expected.append(np.repeat(np.arange(n_sites), len(directions)))
        positions = np.einsum("fci,fij->fcj", np.array(frac), cells)
        new = assign_sites(positions, cells, sites)
        _assert_same(new, _assign_sites_brute(positions, cells, sites))
        assert np.array_equal(new.site, np.array(expected) if inside
                              else np.full_like(new.site, -1))


def test_ties_go_to_the_lowest_site_index():
    """Every site twice (shuffled): a sample is equally far from both copies."""
    import dataclasses

    from jobs.sites import SiteSet, _assign_sites_brute

    atoms, sites = _p2_supercell((1, 1, 1))
    n_sites = len(sites.centres_frac)
    order = np.random.default_rng(5).permutation(2 * n_sites)
    twice = dataclasses.replace(
        sites, centres_frac=np.concatenate([sites.centres_frac] * 2)[order],
        site_class=np.concatenate([sites.site_class] * 2)[order],
        site_layer=np.concatenate([sites.site_layer] * 2)[order])
    assert isinstance(twice, SiteSet)
    cells = atoms.cell[:][None]
    positions = (sites.centres_frac + [0.01, -0.02, 0.0]) @ atoms.cell[:]
    new = assign_sites(positions[None], cells, twice)
    _assert_same(new, _assign_sites_brute(positions[None], cells, twice))
    copies = order % n_sites  # original site of each index of `twice`
    lowest = [np.flatnonzero(copies == s).min() for s in range(n_sites)]
    assert new.site[0].tolist() == lowest


def test_non_finite_samples_and_empty_inputs_are_as_all_pairs():
    from jobs.sites import _assign_sites_brute

    atoms, sites = _p2_supercell((1, 1, 1))
    na = atoms.numbers == 11
    positions = atoms.positions[na][None].copy()
    positions[0, 0] = np.nan
    positions[0, 1, 0] = np.inf
    cells = atoms.cell[:][None]
    with np.errstate(invalid="ignore"):
        new = assign_sites(positions, cells, sites)
        _assert_same(new, _assign_sites_brute(positions, cells, sites))
    assert new.site[0, :2].tolist() == [-1, -1] and np.all(new.site[0, 2:] >= 0)
    for shape in ((0, 16, 3), (2, 0, 3)):
        empty = assign_sites(np.zeros(shape), np.broadcast_to(atoms.cell[:], (shape[0], 3, 3)),
                             sites)
        assert empty.site.shape == shape[:2] and empty.frac.shape == shape


def test_bins_are_no_narrower_than_the_reach_of_a_site_circle():
    """Hexagonal a = b = 10.019 A: a circle of 0.8 A spans 0.8 / (a sin 60) = 0.0922 of a and
    of b, so 10 bins of 0.1 per axis (not 12 from 0.8 / a)."""
    from jobs.sites import _bins_per_axis

    atoms, sites = _p2_supercell((1, 1, 1))
    assert _bins_per_axis(atoms.cell[:][None], sites) == (10, 10)
    stretched = atoms.cell[:].copy()
    stretched[0] *= 1.5  # a = 15.03 A: the height between the b-lines grows, along a 15 bins
    assert _bins_per_axis(np.stack([atoms.cell[:], stretched]), sites) == (10, 10)
    assert _bins_per_axis(stretched[None], sites) == (13, 10)


def test_a_sample_exactly_at_the_radius_is_inside():
    """Dyadic numbers: the distance is exactly 0.5 A = radius (and 0.5 A + 1/16 just outside)."""
    from jobs.sites import SiteSet, _assign_sites_brute

    sites = SiteSet(np.array([[0.25, 0.25, 0.25], [0.75, 0.75, 0.25]]), np.array([0, 0]),
                    np.array([0, 0]), (EDGE, UNASSIGNED), np.array([0.0, 0.5]), 0.5, "Na")
    cells = np.diag([8.0, 8.0, 8.0])[None]
    frac = np.array([[[0.3125, 0.25, 0.25], [0.25, 0.1875, 0.25], [0.75, 0.6796875, 0.25],
                      [0.75, 0.75, 0.75]]])
    positions = frac @ cells[0]
    new = assign_sites(positions, cells, sites)
    _assert_same(new, _assign_sites_brute(positions, cells, sites))
    assert new.site[0].tolist() == [0, 0, -1, -1]
