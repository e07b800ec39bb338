"""Seed streams: no two consumers draw the same stream; keys of earlier releases are kept."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from engine.seeds import STREAMS, SeedStreams

ROOT = Path(__file__).resolve().parents[2]


def _state(key):
    return tuple(np.random.SeedSequence(key).generate_state(8))


@pytest.mark.parametrize("seed", [0, 5, 2022])
def test_no_two_streams_coincide(seed):
    """Every (stream, indices) over 0..7 per index gives its own generator state."""
    streams = SeedStreams(seed)
    seen = {}
    for name, (index_names, _, _) in STREAMS.items():
        for indices in itertools.product(range(8), repeat=len(index_names)):
            state = _state(streams.key(name, *indices))
            assert state not in seen, f"{name}{indices} == {seen[state]}"
            seen[state] = (name, indices)
    # md x 2, potential x 2, train, gpr sparse + sketch, learn bootstrap, holdout, deepmd,
    # explore, spectrum fit
    assert len(seen) == 64 * 2 + 2 + 1 + 8 + 64 + 8 + 8 + 8 + 64 + 64 + 512 + 1


def test_the_old_collision_is_gone():
    """md velocities of system 2, replica f used to be train's member 1 of fold f."""
    streams = SeedStreams(2022)
    for fold in range(5):
        assert _state(streams.key("md.velocities", 2, fold)) != _state(
            streams.key("train.network", fold, 1))
    # the trap itself: numpy pads entropy with zeros to 4 words
    assert _state([2022, 5, 0]) == _state([2022, 5, 0, 0])


def test_keys_of_earlier_releases():
    """The same manifest gives the same md trajectories, splits and first networks."""
    streams = SeedStreams(2022)
    assert streams.key("md.velocities", 1, 3) == [2022, 5, 1, 3, 1]
    assert streams.key("md.thermostat", 0, 2) == [2022, 5, 0, 2, 2]
    assert streams.key("train.folds") == [2022, 5, 0]
    assert streams.key("train.network", 4, 0) == [2022, 5, 2, 4]
    assert streams.key("potential.holdout") == [2022, 4, 1]


def test_wrong_indices_refused():
    streams = SeedStreams(1)
    with pytest.raises(TypeError):
        streams.key("md.velocities", 1)
    with pytest.raises(KeyError):
        streams.key("md.nothing")
    with pytest.raises(ValueError):
        streams.key("train.validation", -1)


def test_no_stage_builds_its_own_seeded_stream():
    """Only engine/seeds.py derives generators from the manifest seed."""
    offenders = []
    for path in sorted((ROOT / "jobs").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"default_rng\(\s*\[", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
