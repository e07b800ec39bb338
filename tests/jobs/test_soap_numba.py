"""The compiled SOAP kernel reproduces dscribe's rows (its reference) on real and odd frames."""
from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from dscribe.descriptors import SOAP

from jobs.frames import read_labelled_frames
from jobs.shiftmodels.soap import SoapFeaturizer, normalise_rows, wrapped_positions
from jobs.shiftmodels.soap_numba import CHECK_ATOL, NumbaGtoSoap

SPECIES = ["Na", "Mg", "Mn", "O"]


def dscribe_rows(frames, centre=11, **settings):
    soap = SOAP(species=SPECIES, r_cut=5.5, n_max=9, l_max=9, sigma=0.5, rbf="gto",
                periodic=True, sparse=False, dtype="float64", **settings)
    rows = []
    for frame in frames:
        frame = frame.copy()
        frame.wrap(eps=0.0)
        centres = np.flatnonzero(frame.numbers == centre).tolist()
        rows.append(normalise_rows(soap.create(frame, centers=centres)))
    return soap, np.concatenate(rows)


@pytest.fixture(scope="module")
def real_frames(shared_data):
    frames = []
    for name in ("p63mcm-dev.extxyz", "p6322-dev.extxyz"):
        frames.extend(read_labelled_frames(shared_data / name)[:3])
    return frames


def test_real_frames_equal_dscribe(real_frames):
    soap, reference = dscribe_rows(real_frames)
    kernel = NumbaGtoSoap(soap)
    assert kernel.ok, kernel.why
    numbers = real_frames[0].numbers
    for half, stacking in enumerate((real_frames[:3], real_frames[3:])):
        positions = np.stack([f.positions for f in stacking])
        cells = np.stack([f.cell.array for f in stacking])
        rows = kernel.power_spectrum(numbers, wrapped_positions(positions, cells), cells,
                                     np.flatnonzero(numbers == 11))
        expected = reference[half * len(rows):(half + 1) * len(rows)]
        assert rows.shape == expected.shape == (48, 6660)
        assert np.abs(rows - expected).max() < CHECK_ATOL
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)


def test_small_triclinic_cell_needs_several_images():
    """A 4 A cell: the cutoff (5.5 A + padding) reaches two and more images per axis."""
    rng = np.random.default_rng(3)
    cell = np.array([[4.0, 0.0, 0.0], [1.3, 4.2, 0.0], [0.4, -0.6, 4.5]])
    numbers = np.array([11, 11, 12, 25, 8, 8, 8])
    frame = Atoms(numbers=numbers, positions=rng.uniform(0, 1, (7, 3)) @ cell, cell=cell,
                  pbc=True)
    soap, reference = dscribe_rows([frame])
    kernel = NumbaGtoSoap(soap)
    assert kernel.ok, kernel.why
    assert kernel.image_shifts(cell[None]).shape[1] >= 5 ** 3
    rows = kernel.power_spectrum(numbers, wrapped_positions(frame.positions[None], cell[None]),
                                 cell[None], np.array([0, 1]))
    assert np.abs(rows - reference).max() < CHECK_ATOL


def test_settings_it_does_not_cover_are_refused():
    soap = SOAP(species=SPECIES, r_cut=5.5, n_max=4, l_max=3, sigma=0.5, rbf="gto",
                periodic=True, weighting={"function": "poly", "r0": 5.0, "c": 1, "m": 1})
    kernel = NumbaGtoSoap(soap)
    assert not kernel.ok and "unweighted" in kernel.why


def test_featurizer_kernels_agree_and_unwrapped_positions_are_handled(real_frames):
    numbers = real_frames[0].numbers
    positions = np.stack([f.positions for f in real_frames[:3]])
    cells = np.stack([f.cell.array for f in real_frames[:3]])
    positions = positions + cells[:, 0][:, None, :] * np.array([2, -1, 3])[:, None, None]
    fast = SoapFeaturizer(SPECIES, "Na", kernel="numba")
    reference = SoapFeaturizer(SPECIES, "Na", kernel="dscribe")
    assert fast.array_kernel() == "numba" and reference.array_kernel() == "dscribe"
    got = fast.features_arrays(numbers, positions, cells)
    expected = reference.features_arrays(numbers, positions, cells)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.abs(got - expected).max() < CHECK_ATOL
