"""Readers of labelled frames: the real OUTCARs match their frames in the shared extxyz files."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from engine.failure import InputError
from jobs.frames import FERMI_CONTACT_KEY, read_labelled_frames, read_outcar

PAIRS = [("OUTCAR.p63mcm-2", "p63mcm-dev.extxyz", "p63mcm/OUTCAR2"),
         ("OUTCAR.p6322-8", "p6322-dev.extxyz", "p6322/OUTCAR8")]


@pytest.fixture(scope="module")
def extxyz_frames(shared_data):
    return {name: read_labelled_frames(shared_data / name) for _, name, _ in PAIRS}


def test_extxyz_reads_every_frame(extxyz_frames):
    for frames in extxyz_frames.values():
        assert len(frames) == 400
        assert all(len(a) == 88 for a in frames)
        assert frames[0].get_chemical_symbols()[:16] == ["Na"] * 16
        assert frames[0].arrays[FERMI_CONTACT_KEY].shape == (88,)
        assert frames[0].get_forces().shape == (88, 3)
    first = extxyz_frames["p63mcm-dev.extxyz"][0]
    assert first.info["source"] == "p63mcm/OUTCAR2"
    assert first.get_potential_energy() == pytest.approx(-902.82890897)
    assert first.arrays[FERMI_CONTACT_KEY][0] == pytest.approx(0.884)


@pytest.mark.parametrize("outcar,extxyz,source", PAIRS)
def test_outcar_matches_its_extxyz_frame(shared_data, extxyz_frames, outcar, extxyz, source):
    atoms = read_outcar(shared_data / outcar)
    matches = [a for a in extxyz_frames[extxyz] if a.info["source"] == source]
    assert len(matches) == 1
    ref = matches[0]
    assert atoms.get_chemical_symbols() == ref.get_chemical_symbols()
    np.testing.assert_allclose(atoms.positions, ref.positions, atol=1e-6)
    np.testing.assert_allclose(atoms.cell[:], ref.cell[:], atol=1e-6)
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), ref.get_forces(), atol=1e-6)
    np.testing.assert_allclose(atoms.arrays[FERMI_CONTACT_KEY], ref.arrays[FERMI_CONTACT_KEY],
                               atol=1e-6)
    assert atoms.info["magnetic_moment_s"] == pytest.approx(48.0, abs=1e-3)
    assert atoms.info["source"].endswith(outcar)


def test_folder_of_outcars_is_sorted(shared_data, tmp_path):
    for name in ("OUTCAR.p6322-8", "OUTCAR.p63mcm-2"):
        shutil.copy(shared_data / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an OUTCAR")
    frames = read_labelled_frames(tmp_path)
    assert [a.info["source"].rsplit("/", 1)[-1] for a in frames] == \
        ["OUTCAR.p6322-8", "OUTCAR.p63mcm-2"]


def test_truncated_outcar_names_the_file(shared_data, tmp_path):
    lines = (shared_data / "OUTCAR.p63mcm-2").read_text().splitlines(keepends=True)
    title = max(i for i, l in enumerate(lines) if "Fermi contact (isotropic)" in l)
    cut = tmp_path / "OUTCAR.cut"
    cut.write_text("".join(lines[:title + 30]))
    with pytest.raises(InputError, match="OUTCAR.cut.*truncated"):
        read_outcar(cut)
    bare = tmp_path / "OUTCAR.bare"
    bare.write_text("".join(lines[:title - 3]))
    with pytest.raises(InputError, match="OUTCAR.bare.*no 'Fermi contact"):
        read_labelled_frames(bare)


def test_missing_column_and_missing_file(tmp_path):
    plain = tmp_path / "plain.extxyz"
    plain.write_text('1\nLattice="3 0 0 0 3 0 0 0 3" Properties=species:S:1:pos:R:3 pbc="T T T"\n'
                     "Na 0 0 0\n")
    with pytest.raises(InputError, match="plain.extxyz: frame 0 has no"):
        read_labelled_frames(plain)
    with pytest.raises(InputError, match="nothere"):
        read_labelled_frames(tmp_path / "nothere.extxyz")


def _spoiled_copy(shared_data, tmp_path, name: str):
    """The first 10 frames of the P6_3/mcm file with a NaN coordinate (frame 7, atom 12) or two
    atoms 0.1 A apart (frame 5, atoms 3 and 40), as an extended XYZ file."""
    import ase.io

    frames = ase.io.read(shared_data / "p63mcm-dev.extxyz", ":10")
    if name == "nan":
        frames[7].positions[12, 0] = np.nan
    else:
        direction = frames[5].positions[40] - frames[5].positions[3]
        frames[5].positions[40] = frames[5].positions[3] + 0.1 * direction / np.linalg.norm(
            direction)
    path = tmp_path / f"{name}.extxyz"
    ase.io.write(path, frames, format="extxyz")
    return path


def test_labelled_frames_with_nan_or_close_atoms_are_refused(shared_data, tmp_path):
    path = _spoiled_copy(shared_data, tmp_path, "nan")
    with pytest.raises(InputError, match=rf"^{path}: frame 7: non-finite coordinate \(atom 12 "
                                         r"\(Na\): \[nan, "):
        read_labelled_frames(path)
    path = _spoiled_copy(shared_data, tmp_path, "close")
    with pytest.raises(InputError, match=rf"^{path}: frame 5: atoms 3 \(Na\) and 40 \(O\) are "
                                         r"0\.10 A apart \(< checks\.min_distance_a = 0\.5 A\)$"):
        read_labelled_frames(path)
    assert len(read_labelled_frames(path, min_distance_a=0.05)) == 10  # the manifest's threshold


@pytest.mark.parametrize("key", ["forces", "energy"])
def test_labelled_frames_with_a_non_finite_label_are_refused(shared_data, tmp_path, key):
    """A NaN force or energy is named before any training (deepmd-kit would stop mid-run)."""
    import ase.io

    frames = ase.io.read(shared_data / "p6322-dev.extxyz", ":4")
    if key == "forces":
        forces = frames[2].get_forces()
        forces[5, 1] = np.nan
        frames[2].calc.results["forces"] = forces
    else:
        frames[2].calc.results["energy"] = float("nan")
    path = tmp_path / "bad.extxyz"
    ase.io.write(path, frames)
    with pytest.raises(InputError, match=rf"^{path}: frame 2: non-finite {key}$"):
        read_labelled_frames(path)
    ase.io.write(path, frames[:2])
    assert len(read_labelled_frames(path)) == 2


def test_outcar_structure_is_checked_when_asked(shared_data):
    outcar = shared_data / "OUTCAR.p63mcm-2"
    read_outcar(outcar)  # the labeller's read: no check
    # its Mn-O bonds (~1.9 A) are closer than a 2.5 A threshold: the file is named
    with pytest.raises(InputError, match=rf"^{outcar}: frame 0: atoms \d+ \(M[gn]\) and \d+ \(O\) "
                                         r"are 1\.\d\d A apart \(< checks\.min_distance_a = 2\.5"):
        read_labelled_frames(outcar, min_distance_a=2.5)
