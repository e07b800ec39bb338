"""Training rows of a shift model: one row per target nucleus of every labelled frame (its
shift and frame), their SOAP features gathered over the ranks, and the frame-wise folds and
validation split every shift model is trained and scored on."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.context import RankContext
from engine.failure import InputError
from engine.progress import Progress
from engine.seeds import SeedStreams
from jobs.frames import FERMI_CONTACT_KEY
from jobs.shift import shift_ppm


@dataclass
class LabelledRows:
    """Target rows of a set of frames: shift (ppm), frame and atom index of every centre."""

    shift_ppm: np.ndarray
    frame: np.ndarray
    atom: np.ndarray


def centre_rows(frames, centre: str, shift_spec) -> LabelledRows:
    """Shifts (ppm, eq. 1) of every `centre` atom of `frames`, frame-major, in atom order."""
    from ase.data import atomic_numbers

    z = atomic_numbers[centre]
    shifts, frame_ids, atom_ids = [], [], []
    for index, atoms in enumerate(frames):
        if FERMI_CONTACT_KEY not in atoms.arrays:
            raise InputError(f"frame {index} ({atoms.info.get('source', '?')}) has no "
                             f"'{FERMI_CONTACT_KEY}'")
        atoms_of_centre = np.flatnonzero(atoms.numbers == z)
        shifts.append(shift_ppm(atoms.arrays[FERMI_CONTACT_KEY][atoms_of_centre], shift_spec))
        frame_ids.append(np.full(len(atoms_of_centre), index, dtype=np.int64))
        atom_ids.append(atoms_of_centre.astype(np.int64))
    return LabelledRows(np.concatenate(shifts), np.concatenate(frame_ids),
                        np.concatenate(atom_ids))


def gather_features(featurizer, frames, ctx: RankContext) -> np.ndarray:
    """SOAP rows of all frames on every rank; each rank computes a contiguous block of frames."""
    from mpi4py import MPI

    mine = ctx.block(len(frames))
    progress = Progress(ctx, "train SOAP", len(mine), "frames")
    blocks = []
    for start in range(mine.start, mine.stop, 32):
        stop = min(start + 32, mine.stop)
        blocks.append(featurizer.features(frames[start:stop]))
        progress.update(stop - start)
    progress.finish()
    n_features = featurizer.n_features
    local = np.concatenate(blocks) if blocks else np.zeros((0, n_features), np.float32)
    local = np.ascontiguousarray(local, dtype=np.float32)
    counts = np.array(ctx.comm.allgather(local.size), dtype=np.int64)
    out = np.empty(int(counts.sum()), dtype=np.float32)
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ctx.comm.Allgatherv(local.reshape(-1), [out, counts, displs, MPI.FLOAT])
    return out.reshape(-1, n_features)


def frame_folds(n_frames: int, folds: int, seed: int) -> np.ndarray:
    """Fold (0..folds-1) of every frame: a seeded permutation dealt round-robin."""
    if n_frames < folds:
        raise InputError(f"train: {n_frames} frames cannot make {folds} folds")
    rng = SeedStreams(seed).rng("train.folds")
    fold_of_frame = np.empty(n_frames, dtype=np.int64)
    fold_of_frame[rng.permutation(n_frames)] = np.arange(n_frames) % folds
    return fold_of_frame


def validation_frames(train_frames: np.ndarray, fraction: float, seed: int,
                      fold: int) -> np.ndarray:
    """Frames of a fold's training set held out for early stopping (at least one)."""
    rng = SeedStreams(seed).rng("train.validation", fold)
    n_val = max(1, int(round(fraction * len(train_frames))))
    return np.sort(rng.choice(train_frames, n_val, replace=False))


def model_seed(seed: int, fold: int, member: int = 0) -> int:
    """Seed of the weights, dropout and batch order of one network of a fold."""
    return SeedStreams(seed).integer("train.network", fold, member)
