"""SOAP featurisation of Na centres: feature count, normalisation, invariances, settings."""
from __future__ import annotations

import ase.io
import numpy as np
import pytest

from engine.failure import InputError
from jobs.shiftmodels.soap import SoapFeaturizer

SPECIES = ["Na", "Mg", "Mn", "O"]


@pytest.fixture(scope="module")
def frames(shared_data):
    return ase.io.read(shared_data / "p63mcm-dev.extxyz", ":3")


@pytest.fixture(scope="module")
def featurizer():
    return SoapFeaturizer(SPECIES)


def test_feature_count_matches_the_paper_settings(featurizer):
    # 4 same-species blocks of n(n+1)/2 and 6 cross blocks of n^2 radial pairs, 10 l each
    assert featurizer.n_features == (4 * 45 + 6 * 81) * 10 == 6660


def test_rows_are_frame_major_unit_norm_float32(featurizer, frames):
    features = featurizer.features(frames)
    assert features.dtype == np.float32
    assert features.shape == (3 * 16, 6660)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-6)
    # frame-major: the rows of frame 1 alone are rows 16..31 of the batch
    np.testing.assert_allclose(featurizer.features(frames[1:2]), features[16:32], atol=1e-7)
    # different Na see different environments
    assert np.abs(features[0] - features[1]).max() > 1e-3


def test_invariant_to_translation_and_image_shifts(featurizer, frames):
    reference = featurizer.features(frames[:1])
    moved = frames[0].copy()
    moved.positions += [3.1, -7.2, 20.5]
    imaged = frames[0].copy()
    cell = imaged.cell.array
    imaged.positions[5] += 2 * cell[0] - cell[2]  # a Na, two cells away (unwrapped MD)
    imaged.positions[30] += cell[1]  # a Mn
    imaged.positions[70] -= 3 * cell[2]  # an O
    result = featurizer.features([moved, imaged])
    np.testing.assert_allclose(result[:16], reference, atol=1e-6)
    np.testing.assert_allclose(result[16:], reference, atol=1e-6)


def test_a_displaced_neighbour_changes_the_features(featurizer, frames):
    reference = featurizer.features(frames[:1])
    moved = frames[0].copy()
    moved.positions[40] += [0.3, 0.0, 0.0]  # an O
    assert np.abs(featurizer.features([moved]) - reference).max() > 1e-4


def test_settings_round_trip(featurizer, frames):
    settings = featurizer.settings()
    rebuilt = SoapFeaturizer.from_settings(settings)
    assert rebuilt.settings() == settings
    np.testing.assert_array_equal(rebuilt.features(frames[:1]), featurizer.features(frames[:1]))
    with pytest.raises(InputError, match="features"):
        SoapFeaturizer.from_settings({**settings, "n_features": 123})


def test_unknown_species_is_an_input_error(featurizer, frames):
    bad = frames[0].copy()
    bad.numbers[20] = 28  # Ni
    with pytest.raises(InputError, match="Ni"):
        featurizer.features([bad])


def test_float32_dscribe_equals_a_float64_reference(featurizer, frames):
    # the speed-up (dscribe in single precision) must keep the features within 1e-5
    from dscribe.descriptors import SOAP

    reference = SOAP(species=SPECIES, r_cut=5.5, n_max=9, l_max=9, sigma=0.5, rbf="gto",
                     periodic=True, sparse=False, dtype="float64")
    expected = []
    for frame in frames:
        frame = frame.copy()
        frame.wrap(eps=0.0)
        rows = reference.create(frame, centers=np.flatnonzero(frame.numbers == 11).tolist())
        expected.append(rows / np.linalg.norm(rows, axis=1, keepdims=True))
    got = featurizer.features(frames)
    np.testing.assert_allclose(got, np.concatenate(expected), rtol=0, atol=1e-5)
    assert np.abs(got).max() > 0.1


def test_arrays_path_wraps_unwrapped_positions_like_ase(featurizer, frames):
    rng = np.random.default_rng(7)
    positions = np.stack([f.positions for f in frames])
    cells = np.stack([f.cell.array for f in frames])
    images = rng.integers(-2, 3, positions.shape)
    unwrapped = positions + np.einsum("fai,fij->faj", images, cells)
    got = featurizer.features_arrays(frames[0].numbers, unwrapped, cells)
    np.testing.assert_allclose(got, featurizer.features(frames), rtol=0, atol=1e-6)
    assert got.shape == (16 * len(frames), 6660)
