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
