"""The ``/md`` group: one group per system (atomic numbers, structure) and one per replica
(positions, cells, time, temperature, energy, resume state, force deviations; docs/md.md).

The md stage creates and fills it through :func:`create_datasets` and
:func:`create_deviation_datasets`; later stages read it through :func:`md_trajectories`,
:func:`md_replicas` and :func:`thermostat_text`."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from engine.failure import InputError
from engine.store import RunStore
from schemas.md import MdSpec

RNG_STATE_BYTES = 512
"""Size of the fixed-length field that holds a replica's thermostat RNG state (JSON)."""


GROUP = "/md"
"""The store group this stage owns: ``/md/<system>`` (attrs, ``numbers``) and one group per
replica, ``/md/<system>/r000`` ... (see :func:`replica_group`). Read it with
:func:`md_trajectories`."""


def system_group(system: str, root: str = GROUP) -> str:
    """Store group of one system's trajectories."""
    return f"{root}/{system}"


def replica_group(system: str, replica: int, root: str = GROUP) -> str:
    """Store group of one replica's trajectory."""
    return f"{root}/{system}/r{replica:03d}"


@dataclass(frozen=True)
class MdTask:
    """One trajectory: a system and a replica number."""

    system_index: int
    system: str
    replica: int

    @property
    def group(self) -> str:
        """Store group of this trajectory."""
        return replica_group(self.system, self.replica)


def md_tasks(systems, replicas: int) -> list[MdTask]:
    """Every (system, replica) pair in a fixed order (system-major)."""
    return [MdTask(i, s.name, r) for i, s in enumerate(systems) for r in range(replicas)]


def create_datasets(store: RunStore, task: MdTask, n_atoms: int, spec: MdSpec) -> None:
    """Create one replica's pre-sized datasets (collective: every rank, same order)."""
    n, chunk = spec.frames, min(spec.chunk_frames, spec.frames)
    g = task.group
    store.create_dataset(f"{g}/positions_a", (n, n_atoms, 3), "f8", chunks=(chunk, n_atoms, 3),
                         unit="angstrom", note="unwrapped (continuous across the cell boundary)")
    store.create_dataset(f"{g}/cell_a", (n, 3, 3), "f8", chunks=(chunk, 3, 3), unit="angstrom")
    store.create_dataset(f"{g}/time_fs", (n,), "f8", chunks=(chunk,), unit="fs",
                         fill_value=np.nan, note="0 = end of equilibration")
    store.create_dataset(f"{g}/temperature_k", (n,), "f8", chunks=(chunk,), unit="K",
                         fill_value=np.nan)
    store.create_dataset(f"{g}/potential_energy_ev", (n,), "f8", chunks=(chunk,), unit="eV",
                         fill_value=np.nan)
    store.create_dataset(f"{g}/resume_momenta", (n_atoms, 3), "f8",
                         unit="ASE (amu * A / (A * sqrt(amu / eV)))",
                         note="momenta after the last saved frame")
    store.create_dataset(f"{g}/resume_thermostat", (RNG_STATE_BYTES,), "u1",
                         note="JSON: Langevin RNG bit-generator state or Nose-Hoover chain "
                              "variables after the last saved frame")
    store.create_dataset(f"{g}/resume_saved", (1,), "i8", fill_value=0,
                         note="frames saved when resume_momenta/resume_thermostat were written")


DEVIATION_DATASETS = ("model_devi_f_ev_a", "model_devi_f_mean_ev_a")
"""A replica's per-frame force deviations of the model ensemble (jobs/deviation.py): DP-GEN's
``max_devi_f`` (max over atoms) and ``avg_devi_f`` (mean over atoms), eV/A."""


def create_deviation_datasets(store: RunStore, task: MdTask, spec: MdSpec) -> None:
    """Create one replica's pre-sized, NaN-filled deviation datasets (collective)."""
    n, chunk = spec.frames, min(spec.chunk_frames, spec.frames)
    notes = ("DP-GEN max_devi_f: max over atoms of the std over models of the force vector",
             "DP-GEN avg_devi_f: mean over atoms of the std over models of the force vector")
    for name, note in zip(DEVIATION_DATASETS, notes):
        store.create_dataset(f"{task.group}/{name}", (n,), "f8", chunks=(chunk,),
                             unit="eV/angstrom", fill_value=np.nan, note=note)


def _check_compatible(store: RunStore, task: MdTask, spec: MdSpec, n_atoms: int) -> None:
    """A resumed store must have been made with the same frame count, interval and cell."""
    shape = store.shape(f"{task.group}/positions_a")
    attrs = store.attrs(task.group)
    expected = {"save_interval_fs": spec.save_every_steps * spec.timestep_fs,
                "timestep_fs": spec.timestep_fs}
    if shape != (spec.frames, n_atoms, 3) or any(
            attrs.get(k) is not None and abs(attrs[k] - v) > 1e-12 for k, v in expected.items()):
        from engine.failure import InputError

        raise InputError(f"md: the store's {task.group} was made with other settings "
                         f"(frames, atoms {shape[:2]}; {attrs}); use a new store or --redo md")


@dataclass(frozen=True)
class Replica:
    """One replica's trajectory in the store."""

    number: int
    group: str
    n_saved: int
    """Valid frames (``resume_saved``, written with every chunk; else the attribute
    ``n_saved``; else the dataset length)."""


@dataclass(frozen=True)
class MdTrajectories:
    """The md stage's trajectories of one system, as later stages read them (no communication).

    Attributes
    ----------
    system
        The system's name.
    numbers
        Atomic numbers of its atoms.
    replicas
        The replicas in replica order.
    """

    store: RunStore
    system: str
    numbers: np.ndarray
    replicas: tuple[Replica, ...]

    @property
    def group(self) -> str:
        """The system's store group (for messages)."""
        return self.replicas[0].group.rsplit("/", 1)[0]

    def replica(self, number: int) -> Replica:
        """The replica with this number."""
        for replica in self.replicas:
            if replica.number == number:
                return replica
        raise KeyError(f"{self.system}: no md replica {number}")

    def positions_a(self, replica: Replica, selection=()) -> np.ndarray:
        """Positions (A, unwrapped) of `selection` of the replica's frames."""
        return self.store.read(f"{replica.group}/positions_a", selection)

    def cell_a(self, replica: Replica, selection=()) -> np.ndarray:
        """Cells (A, rows are the vectors) of `selection` of the replica's frames."""
        return self.store.read(f"{replica.group}/cell_a", selection)

    def time_fs(self, replica: Replica, selection=()) -> np.ndarray:
        """Simulated time (fs, 0 = end of equilibration) of `selection` of the frames."""
        return self.store.read(f"{replica.group}/time_fs", selection)

    def has_model_deviation(self, replica: Replica) -> bool:
        """True when md recorded the replica's force deviation (a model ensemble)."""
        return self.store.exists(f"{replica.group}/{DEVIATION_DATASETS[0]}")

    def model_devi_f_ev_a(self, replica: Replica, selection=()) -> np.ndarray | None:
        """DP-GEN's force deviation ``max_devi_f`` (eV/A, max over atoms) of `selection` of the
        replica's frames (NaN where not written); None when md ran without a model ensemble."""
        name = f"{replica.group}/{DEVIATION_DATASETS[0]}"
        return self.store.read(name, selection) if self.store.exists(name) else None

    def model_devi_f_mean_ev_a(self, replica: Replica, selection=()) -> np.ndarray | None:
        """DP-GEN's ``avg_devi_f`` (eV/A, mean over atoms) of `selection` of the frames; None
        when md ran without a model ensemble."""
        name = f"{replica.group}/{DEVIATION_DATASETS[1]}"
        return self.store.read(name, selection) if self.store.exists(name) else None

    def trust_ev_a(self, replica: Replica) -> tuple[float, float] | None:
        """(trust_lo, trust_hi) of the force deviation (eV/A) md recorded; None without."""
        attrs = self.store.attrs(replica.group)
        if "trust_hi_ev_a" not in attrs:
            return None
        return float(attrs["trust_lo_ev_a"]), float(attrs["trust_hi_ev_a"])


def md_trajectories(store: RunStore, system: str, root: str = GROUP) -> MdTrajectories:
    """The trajectories of `system` in the store.

    Raises
    ------
    InputError
        When the store holds no md trajectory of `system`.
    """
    from engine.failure import InputError

    group = system_group(system, root)
    found = []
    for name in store.keys(group):
        if not (name.startswith("r") and name[1:].isdigit()):
            continue
        path = f"{group}/{name}"
        if not store.exists(f"{path}/positions_a"):
            continue
        length = store.shape(f"{path}/positions_a")[0]
        if store.exists(f"{path}/resume_saved"):  # written with every chunk
            n_saved = int(store.read(f"{path}/resume_saved")[0])
        else:
            n_saved = store.attrs(path).get("n_saved")
        n_saved = length if n_saved is None else min(int(n_saved), length)
        found.append(Replica(int(name[1:]), path, int(n_saved)))
    if not found or not store.exists(f"{group}/numbers"):
        raise InputError(f"the store has no md trajectories of system {system!r} "
                         f"(no {group}/r000/positions_a ...); run the md stage first")
    return MdTrajectories(store, system, np.asarray(store.read(f"{group}/numbers"), dtype=int),
                          tuple(sorted(found, key=lambda r: r.number)))


def thermostat_text(store: RunStore, system: str, root: str = GROUP) -> str | None:
    """How the md of `system` was thermostatted, in words (None without md of it)."""
    path = f"{system_group(system, root)}/r000"
    attrs = store.attrs(path)
    if "thermostat" not in attrs:
        return None
    temperature = f"at {attrs.get('temperature_k', float('nan')):g} K"
    if attrs["thermostat"] == "langevin":
        friction = attrs.get("friction_per_fs")
        damping = f", friction {friction:g} /fs" if friction else ""
        return f"a Langevin thermostat {temperature}{damping} (stochastic: slows hopping)"
    tdamp = attrs.get("thermostat_time_fs")
    return (f"a Nose-Hoover chain {temperature}"
            + (f", damping time {tdamp:g} fs" if tdamp else ""))


def md_replicas(store: RunStore, system: str) -> list[tuple[int, str, int]]:
    """(replica number, replica name, saved frames) of every md replica of `system`.

    Raises
    ------
    InputError
        When the store has no md trajectories of `system`.
    """
    try:
        trajectories = md_trajectories(store, system)
    except InputError as exc:
        raise InputError(f"label: {exc}") from None
    return [(r.number, r.group.rsplit("/", 1)[1], r.n_saved) for r in trajectories.replicas]


_REPLICA_NAME = re.compile(r"^r(\d+)$")
