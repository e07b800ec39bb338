"""Seed streams: every random stream of a run is named here, derived from the manifest seed.

A consumer asks for a stream by name and its indices (``seeds.rng("md.velocities", system,
replica)``); nobody builds a ``default_rng([seed, ...])`` key of its own. Keys are numpy
``SeedSequence`` entropy lists. Two lists that differ only by trailing zeros up to numpy's
pool size (4 words) give the same stream ([s, 5, 0] == [s, 5, 0, 0]), and lists of different
consumers can coincide when their indices line up; `tests/engine/test_seeds.py` proves that no
two (stream, indices) pairs of :data:`STREAMS` over the index ranges a run can reach give the
same generator state.

The keys of md, potential and train's folds, validation frames and first network per fold are
those of earlier releases (the same manifest still gives the same numbers). Only the train
stage's second and later networks per fold moved: their old key [seed, 5, 2, fold, member]
was md's velocity stream of system 2, replica `fold` for member 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def _md_velocities(system: int, replica: int) -> tuple[int, ...]:
    return (5, system, replica, 1)


def _md_thermostat(system: int, replica: int) -> tuple[int, ...]:
    return (5, system, replica, 2)


def _train_network(fold: int, member: int) -> tuple[int, ...]:
    return (5, 2, fold) if member == 0 else (7, fold, member)


STREAMS: dict[str, tuple[tuple[str, ...], Callable[..., tuple[int, ...]], str]] = {
    "md.velocities": (("system", "replica"), _md_velocities,
                      "Maxwell-Boltzmann initial velocities of an md replica"),
    "md.thermostat": (("system", "replica"), _md_thermostat,
                      "Langevin random forces of an md replica"),
    "potential.holdout": ((), lambda: (4, 1), "frames of each file held out of DP training"),
    "potential.deepmd": ((), lambda: (101,), "the three seeds of deepmd-kit's input "
                                            "(descriptor, fitting net, training)"),
    "train.folds": ((), lambda: (5, 0), "the k-fold split of the labelled frames"),
    "train.validation": (("fold",), lambda fold: (5, 1, fold),
                         "early-stopping frames of a fold's training set"),
    "train.network": (("fold", "member"), _train_network,
                      "weights, dropout and batch order of one network of a fold"),
    "train.gpr_sparse": (("fold",), lambda fold: (8, fold),
                         "the GPR model's sparse environments (first point, random projection "
                         "or subset) of CV fold `fold`; index `folds`: the final model"),
    "learn.bootstrap": (("system",), lambda system: (10, system),
                        "dpdata's perturbation of a system's structure (the bootstrap frames)"),
    "learn.holdout": (("system", "table"), lambda system, table: (11, system, table),
                      "the validation frames of one label table of the learn campaign"),
    "learn.deepmd": (("iteration", "model"), lambda iteration, model: (12, iteration, model),
                     "the deepmd-kit seeds of one DP model of a learn iteration's ensemble"),
    "learn.explore": (("iteration", "system", "temperature"),
                      lambda iteration, system, temperature: (13, iteration, system,
                                                              temperature),
                      "the initial velocities of one exploration trajectory"),
    "train.gpr_sketch": (("fold",), lambda fold: (9, fold),
                         "the Gaussian sketch of the GPR weight-space (zeta 1) model's "
                         "posterior covariance, CV fold `fold`; index `folds`: the final model"),
    "spectrum.fit": ((), lambda: (14,), "the fit of a measured spectrum: emcee's walkers and "
                                        "moves, the posterior draws, the deconvolution's "
                                        "Monte Carlo"),
}
"""name -> (index names, key template, what draws from it). The template's output follows the
master seed in the SeedSequence entropy."""


@dataclass(frozen=True)
class SeedStreams:
    """The named random streams of one run, all derived from the manifest's `seed`."""

    seed: int

    def key(self, name: str, *indices: int) -> list[int]:
        """The SeedSequence entropy of stream `name` at `indices`.

        Raises
        ------
        KeyError
            For a stream not in :data:`STREAMS`.
        TypeError
            For the wrong number of indices.
        """
        index_names, template, _ = STREAMS[name]
        if len(indices) != len(index_names):
            raise TypeError(f"seed stream {name} takes indices {index_names}, got {indices}")
        if any(int(i) < 0 for i in indices):
            raise ValueError(f"seed stream {name}: indices must be >= 0, got {indices}")
        return [int(self.seed), *template(*(int(i) for i in indices))]

    def rng(self, name: str, *indices: int) -> np.random.Generator:
        """A fresh numpy Generator on stream `name` at `indices`."""
        return np.random.default_rng(self.key(name, *indices))

    def integer(self, name: str, *indices: int) -> int:
        """One integer seed in [0, 2**31) drawn from stream `name` (for Keras, deepmd-kit)."""
        return int(self.rng(name, *indices).integers(2 ** 31))
