"""The ``/label`` group: one label table per system (frames chosen from md, their status, and
the energy, forces, A_iso and shifts of the labelled ones; docs/label.md).

:func:`prepare_table` creates a table (the label stage's ``/label/<system>``, or a learn
iteration's own), :class:`_FrameWriter` writes results row by row, and :func:`labelled_frames`
/ :func:`labelled_frames_in` read the labelled frames back as ASE Atoms."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers

from engine.context import RankContext
from engine.store import RunStore
from schemas.base import duplicates

STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, -1
ERROR_BYTES, PATH_BYTES = 256, 512


GROUP = "/label"
"""The store group this stage owns (``/label/<system>``); read it with
:func:`labelled_frames`."""




TABLE_ATTRS = ("prepared", "n_selected", "system", "target_species", "n_done", "n_failed",
               "failures")
"""Attributes of a label table that :func:`prepare_table` and :func:`label_tables` own."""


@dataclass
class SystemFrames:
    """The frames of one label table (a system's selection), as every rank sees them at the
    start of :func:`label_tables`."""

    name: str
    group: str
    target_species: str
    replica: np.ndarray
    frame: np.ndarray
    numbers: np.ndarray
    status: np.ndarray
    attempts: np.ndarray
    last_error: list[str]
    work_dir: list[str]


def _table_layout(n_frames: int, n_atoms: int) -> list[tuple]:
    """(name, shape, dtype, fill value, unit) of every dataset of a label table."""
    nan = float("nan")
    return [
        ("replica", (n_frames,), "i4", None, ""), ("frame", (n_frames,), "i8", None, ""),
        ("time_fs", (n_frames,), "f8", nan, "fs"), ("numbers", (n_atoms,), "i4", None, ""),
        ("positions_a", (n_frames, n_atoms, 3), "f8", nan, "A"),
        ("cell_a", (n_frames, 3, 3), "f8", nan, "A"),
        ("energy_ev", (n_frames,), "f8", nan, "eV"),
        ("forces_ev_a", (n_frames, n_atoms, 3), "f8", nan, "eV/A"),
        ("a_iso_mhz", (n_frames, n_atoms), "f8", nan, "MHz"),
        ("shift_ppm", (n_frames, n_atoms), "f8", nan, "ppm"),
        ("magnetic_moment_s", (n_frames,), "f8", nan, "mu_B"),
        ("status", (n_frames,), "i1", STATUS_PENDING, ""),
        ("attempts", (n_frames,), "i4", 0, ""),
        ("last_error", (n_frames,), f"S{ERROR_BYTES}", b"", ""),
        ("work_dir", (n_frames,), f"S{PATH_BYTES}", b"", ""),
    ]


def _table_problem(target_species: str, numbers: np.ndarray, replica: np.ndarray,
                   frame: np.ndarray, attrs: dict) -> str | None:
    """What is wrong with the arguments every rank gives :func:`prepare_table`, or None."""
    if numbers.ndim != 1 or not len(numbers):
        return f"numbers must be one atomic number per atom (got shape {numbers.shape})"
    if replica.ndim != 1 or replica.shape != frame.shape:
        return (f"replica and frame must be 1-D and of one length (got shapes {replica.shape} "
                f"and {frame.shape})")
    if not len(frame):
        return "no frames"
    if min(replica.min(), frame.min()) < 0:
        return "replica and frame numbers must be >= 0"
    repeated = duplicates(zip(replica.tolist(), frame.tolist()))
    if repeated:
        return f"every (replica, frame) once: they name the work dirs (got {repeated[:3]} twice)"
    if target_species not in atomic_numbers:
        return f"target_species {target_species!r} is not a chemical element"
    reserved = sorted(set(attrs) & set(TABLE_ATTRS))
    if reserved:
        return f"attrs {reserved} are the table's own"
    return None


def _root_problem(n_frames: int, n_atoms: int, positions_a, cells_a, time_fs) -> str | None:
    """What is wrong with the frame arrays rank 0 gives :func:`prepare_table`, or None."""
    shapes = {"positions_a": (np.shape(positions_a), (n_frames, n_atoms, 3)),
              "cells_a": (np.shape(cells_a), (n_frames, 3, 3))}
    if time_fs is not None:
        shapes["time_fs"] = (np.shape(time_fs), (n_frames,))
    for name, (shape, expected) in shapes.items():
        if tuple(shape) != expected:
            return f"{name} has shape {tuple(shape)}, expected {expected}"
    return None


def prepare_table(ctx: RankContext, store: RunStore, group: str, *, name: str,
                  target_species: str, numbers, positions_a, cells_a, replica, frame, time_fs,
                  attrs: dict | None = None) -> None:
    """Lay out a label table of given frames at `group` (collective, idempotent).

    Creates the datasets of a label table (see the module's layout: every label row NaN,
    status pending) and writes the frames, wrapped into their cells, from rank 0. A group that
    is already prepared is kept as it is (a resumed run labels the frames it chose first).

    Parameters
    ----------
    ctx
        The rank context (every rank calls this with the same `group`, `name`,
        `target_species`, `numbers`, `replica`, `frame` and `attrs`).
    store
        The run store.
    group
        Store group of the table, e.g. ``/label/<system>`` or a stage's own group.
    name
        The table's name (stored as the attribute ``system``): the folder of its frames' work
        directories under the work root, the ``system`` of its labelled frames and messages.
    target_species
        Element whose A_iso is turned into a shift (``shift_ppm``; NaN for other atoms).
    numbers
        Atomic numbers (m,), one composition and atom order for every frame.
    positions_a, cells_a
        Positions (n, m, 3) and cell vectors as rows (n, 3, 3) in A; read on rank 0 only
        (other ranks may pass None).
    replica, frame
        Source replica and frame number of each frame (n,), integers >= 0, each pair once:
        a frame's work directory is ``<work root>/<name>/r<replica:03d>-f<frame:06d>``.
    time_fs
        Simulation time of each frame (n,) in fs, or None (NaN); read on rank 0 only.
    attrs
        Further attributes of `group` (e.g. how the frames were chosen); not the table's own
        (:data:`TABLE_ATTRS`).

    Raises
    ------
    ValueError
        On every rank, for inconsistent arguments (shapes, repeated (replica, frame) pairs,
        an unknown element, no frames).
    """
    if store.attrs(group).get("prepared"):
        return
    attrs = dict(attrs or {})
    numbers = np.asarray(numbers, dtype=np.int32)
    replica, frame = np.asarray(replica, dtype=np.int64), np.asarray(frame, dtype=np.int64)
    problem = _table_problem(target_species, numbers, replica, frame, attrs)
    if problem is None:
        problem = ctx.comm.bcast(_root_problem(len(frame), len(numbers), positions_a, cells_a,
                                               time_fs) if ctx.is_root else None, root=0)
    if problem is not None:
        raise ValueError(f"label table {group}: {problem}")
    n_frames, n_atoms = len(frame), len(numbers)
    for key, shape, dtype, fill, unit in _table_layout(n_frames, n_atoms):
        store.create_dataset(f"{group}/{key}", shape, dtype=dtype, fill_value=fill, unit=unit)
    if ctx.is_root:
        positions = np.empty((n_frames, n_atoms, 3))
        cells = np.empty((n_frames, 3, 3))
        for row, (xyz, cell) in enumerate(zip(positions_a, cells_a)):
            atoms = Atoms(numbers=numbers, positions=xyz, cell=cell, pbc=True)
            atoms.wrap()
            positions[row], cells[row] = atoms.positions, np.asarray(atoms.cell)
        times = np.full(n_frames, np.nan) if time_fs is None else np.asarray(time_fs, float)
        for key, values in (("replica", replica), ("frame", frame), ("time_fs", times),
                            ("numbers", numbers), ("positions_a", positions),
                            ("cell_a", cells)):
            store.write_rows(f"{group}/{key}", 0, values)
    store.flush()
    store.set_attrs(group, prepared=True, n_selected=n_frames, system=name,
                    target_species=target_species, **attrs)
    store.flush()


def _load_table(store: RunStore, group: str, name: str, target_species: str) -> SystemFrames:
    """The table at `group`, identical on every rank (collective: rank 0 reads it)."""
    if not store.attrs(group).get("prepared"):
        raise ValueError(f"label: {group} is not a prepared label table (prepare_table first)")
    table = {key: store.read_shared(f"{group}/{key}") for key in (
        "replica", "frame", "numbers", "status", "attempts", "last_error", "work_dir")}
    return SystemFrames(
        name=name, group=group, target_species=target_species,
        replica=table["replica"], frame=table["frame"], numbers=table["numbers"],
        status=table["status"], attempts=table["attempts"],
        last_error=[v.decode(errors="replace") for v in table["last_error"]],
        work_dir=[v.decode(errors="replace") for v in table["work_dir"]])


def _text_row(text: str, n_bytes: int) -> np.ndarray:
    return np.array([text.encode()[: n_bytes - 1]], dtype=f"S{n_bytes}")


class _FrameWriter:
    """Writes one rank's results into /label/<system>, row by row (independent writes)."""

    def __init__(self, store: RunStore, shift_spec):
        self.store, self.shift_spec = store, shift_spec

    def attempt(self, frames: SystemFrames, row: int, attempts: int, error: str) -> None:
        self.store.write_rows(f"{frames.group}/last_error", row, _text_row(error, ERROR_BYTES))
        self.store.write_rows(f"{frames.group}/attempts", row, [attempts])

    def work_dir(self, frames: SystemFrames, row: int, path: Path) -> None:
        self.store.write_rows(f"{frames.group}/work_dir", row, _text_row(str(path), PATH_BYTES))

    def done(self, frames: SystemFrames, row: int, labelled: Atoms, attempts: int) -> None:
        from jobs.frames import FERMI_CONTACT_KEY
        from jobs.shift import shift_ppm

        group, write = frames.group, self.store.write_rows
        a_iso = np.asarray(labelled.arrays[FERMI_CONTACT_KEY], dtype=float)
        target = frames.numbers == atomic_numbers[frames.target_species]
        shifts = np.where(target, shift_ppm(a_iso, self.shift_spec), np.nan)
        write(f"{group}/energy_ev", row, [labelled.get_potential_energy()])
        write(f"{group}/forces_ev_a", row, [labelled.get_forces()])
        write(f"{group}/a_iso_mhz", row, [a_iso])
        write(f"{group}/shift_ppm", row, [shifts])
        write(f"{group}/magnetic_moment_s", row,
              [labelled.info.get("magnetic_moment_s", np.nan)])
        write(f"{group}/attempts", row, [attempts])
        write(f"{group}/status", row, [STATUS_DONE])  # last: a row is done only when complete

    def failed(self, frames: SystemFrames, row: int) -> None:
        self.store.write_rows(f"{frames.group}/status", row, [STATUS_FAILED])


def has_labels(store: RunStore) -> bool:
    """True when the store holds a label stage's results."""
    return store.exists(GROUP)


def labelled_frames(store: RunStore, systems: list[str] | None = None) -> list[Atoms]:
    """The done frames of the label stage, in the form of :func:`jobs.frames.read_outcar`.

    Parameters
    ----------
    store
        A run store holding /label (any rank may call this; no communication).
    systems
        Names of the systems to read (default: every labelled system, in manifest order).

    Returns
    -------
    list of ase.Atoms
        As :func:`labelled_frames_in` gives them, ``info["system"]`` the system's name.
    """
    names = systems if systems is not None else store.attrs(GROUP).get(
        "systems", store.keys(GROUP))
    return labelled_frames_in(store, [f"{GROUP}/{name}" for name in names])


def labelled_frames_in(store: RunStore, groups: list[str]) -> list[Atoms]:
    """The done frames of label tables at any groups, table by table, row by row.

    Parameters
    ----------
    store
        A run store (any rank may call this; no communication).
    groups
        Store groups of label tables (:func:`prepare_table`); a group without one is skipped.

    Returns
    -------
    list of ase.Atoms
        Per done frame: positions (A, wrapped), cell, pbc; energy (eV) and forces (eV/A) in a
        SinglePointCalculator; ``arrays["fermi_contact_mhz"]`` and ``arrays["shift_ppm"]``;
        ``info`` with source (``<store>:<group>#<row>``), system (the table's ``system``
        attribute, else the group's last path component), replica, frame, time_fs and
        magnetic_moment_s.
    """
    from jobs.frames import FERMI_CONTACT_KEY

    frames: list[Atoms] = []
    for group in groups:
        if not store.exists(f"{group}/status"):
            continue
        rows = np.flatnonzero(store.read(f"{group}/status") == STATUS_DONE)
        if not len(rows):
            continue
        name = store.attrs(group).get("system") or group.rstrip("/").rsplit("/", 1)[-1]
        numbers = store.read(f"{group}/numbers")
        data = {key: store.read(f"{group}/{key}")[rows] for key in (
            "replica", "frame", "time_fs", "positions_a", "cell_a", "energy_ev", "forces_ev_a",
            "a_iso_mhz", "shift_ppm", "magnetic_moment_s")}
        for i, row in enumerate(rows):
            atoms = Atoms(numbers=numbers, positions=data["positions_a"][i],
                          cell=data["cell_a"][i], pbc=True)
            atoms.arrays[FERMI_CONTACT_KEY] = data["a_iso_mhz"][i]
            atoms.arrays["shift_ppm"] = data["shift_ppm"][i]
            atoms.calc = SinglePointCalculator(atoms, energy=float(data["energy_ev"][i]),
                                               forces=data["forces_ev_a"][i])
            atoms.info.update(
                source=f"{store.path}:{group}#{row}", system=name,
                replica=int(data["replica"][i]), frame=int(data["frame"][i]),
                time_fs=float(data["time_fs"][i]),
                magnetic_moment_s=float(data["magnetic_moment_s"][i]))
            frames.append(atoms)
    return frames
