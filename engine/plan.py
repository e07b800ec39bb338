"""`dynshift run --dry-run`: the plan of a validated manifest, without doing any work.

The plan says which stages run or are skipped (complete in the store), the systems, how each
stage splits its work over the ranks (the same rules as the stages: md replicas round robin,
label / infer / analyze contiguous blocks, train folds x members data-parallel), and the size
the store will reach. An existing store is only read (h5py, read-only, no file locking); a
store that does not exist is not created.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.inputs import SystemFacts, system_facts

STATUS_COMPLETE = "complete"
"""The stage status engine.store records for a finished stage."""


@dataclass(frozen=True)
class StoreState:
    """What the plan knows of the store: whether it exists, the status of each stage."""

    path: Path
    exists: bool
    status: dict
    problem: str | None = None


def read_store_state(path: Path) -> StoreState:
    """Stage statuses of the store at `path` (read-only, serial, no locking); never writes."""
    path = Path(path)
    if not path.exists():
        return StoreState(path, False, {})
    from engine.store import store_damage

    damage = store_damage(path)  # in a child process: a corrupt file can crash HDF5
    if damage is not None:
        return StoreState(path, True, {}, damage)
    try:
        import h5py

        with h5py.File(path, "r", locking=False) as handle:
            status = {}
            if "stages" in handle:
                for name, group in handle["stages"].items():
                    value = group.attrs.get("status")
                    status[name] = value.decode() if isinstance(value, bytes) else value
            return StoreState(path, True, status)
    except Exception as exc:  # noqa: BLE001 - a store that cannot be read is reported
        return StoreState(path, True, {}, " ".join(str(exc).split()) or type(exc).__name__)


class _ReadOnlyStore:
    """The reading interface the layouts' ``has_*`` use, over an h5py file opened read-only."""

    def __init__(self, handle):
        self.handle = handle

    def exists(self, name: str) -> bool:
        return name in self.handle

    def attrs(self, name: str = "/") -> dict:
        from engine.store import _decode

        if name not in self.handle:
            return {}
        return {k: _decode(v) for k, v in self.handle[name].attrs.items()}


def published_artefacts(state: StoreState) -> set[str]:
    """The stages whose artefacts (DP model, shift model, campaign) the store holds."""
    if not state.exists or state.problem is not None:
        return set()
    import h5py

    from jobs.artefacts import published_in

    with h5py.File(state.path, "r", locking=False) as handle:
        return published_in(_ReadOnlyStore(handle))


def _model_lines(manifest, state: StoreState) -> list[str]:
    """Which DP model md and which shift model infer will use, and why (jobs.artefacts)."""
    from jobs.artefacts import PUBLISHERS, dp_choice, shift_choice

    held = published_artefacts(state)
    will = held | {s for s in manifest.stages if s in {*PUBLISHERS["dp"], *PUBLISHERS["shift"]}}
    lines = []
    choices = []
    if "md" in manifest.stages:
        choices.append(("md", "DP model", dp_choice(will, manifest.potential.model)))
    if "infer" in manifest.stages and manifest.infer.shifts_from == "model":
        choices.append(("infer", "shift model", shift_choice(will, manifest.infer.model)))
    if choices:
        lines.append("models:")
    for stage, what, choice in choices:
        when = (" [published by this run's stage]" if choice.source in manifest.stages
                and choice.source not in held else "")
        lines.append(f"  {stage:<10} {what}: {choice.describe()}{when}")
    return lines


def _block_sizes(n_items: int, ranks: int) -> list[int]:
    """Items per rank of engine.context.RankContext.block (contiguous, sizes differ by <= 1)."""
    bounds = np.linspace(0, n_items, ranks + 1).round().astype(int)
    return np.diff(bounds).tolist()


def _round_robin_sizes(n_items: int, ranks: int) -> list[int]:
    """Items per rank of RankContext.round_robin (rank, rank + size, ...)."""
    return [len(range(rank, n_items, ranks)) for rank in range(ranks)]


def _spread(sizes: list[int]) -> str:
    """`3 on ranks 0-1, 2 on rank 2` style summary of per-rank counts."""
    parts, start = [], 0
    for index in range(1, len(sizes) + 1):
        if index == len(sizes) or sizes[index] != sizes[start]:
            ranks = f"rank {start}" if index - start == 1 else f"ranks {start}-{index - 1}"
            parts.append(f"{sizes[start]} on {ranks}")
            start = index
    return ", ".join(parts)


def _size(n_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{int(n_bytes)} B"


def count_file_frames(path: Path, limit_bytes: int = 2_000_000_000) -> int | None:
    """Frames of an (extended) XYZ file, counted from its atom-count lines; None otherwise."""
    path = Path(path)
    if path.suffix.lower() not in (".xyz", ".extxyz") or not path.is_file() or \
            path.stat().st_size > limit_bytes:
        return None
    frames = 0
    with open(path, "rb") as handle:
        while True:
            line = handle.readline()
            if not line:
                return frames
            if not line.strip():
                continue
            try:
                n_atoms = int(line)
            except ValueError:
                return None
            for _ in range(n_atoms + 1):
                handle.readline()
            frames += 1


def soap_features(species: int, n_max: int, l_max: int) -> int:
    """Length of a dscribe SOAP row (crossover, GTO): (S n)(S n + 1)/2 (l + 1)."""
    sn = species * n_max
    return sn * (sn + 1) // 2 * (l_max + 1)


def md_frames_per_replica(manifest) -> int:
    """Frames of one md replica that infer reads (after skip_frames, every stride-th)."""
    infer = manifest.infer
    return max(0, -(-(manifest.md.frames - infer.skip_frames) // infer.stride))


def plan_text(manifest, store_path: Path, ranks: int, redo: tuple[str, ...] = (),
              source: str = "manifest") -> str:
    """The plan of `manifest` on `ranks` ranks with the store at `store_path` (no work)."""
    ranks = max(1, int(ranks))
    state = read_store_state(store_path)
    facts: list[SystemFacts | None] = [system_facts(s, None, i)
                                       for i, s in enumerate(manifest.systems)]
    lines = [f"dynshift plan (dry run, nothing is run or written): {source}",
             f"ranks: {ranks}"]
    if not state.exists:
        lines.append(f"store: {state.path} (new: the run creates it)")
    elif state.problem is not None:
        lines.append(f"store: {state.path} cannot be opened ({state.problem}); the run would "
                     "refuse it as damaged. It was not touched.")
    else:
        done = [k for k, v in state.status.items() if v == STATUS_COMPLETE]
        lines.append(f"store: {state.path} (exists; complete stages: {', '.join(done) or '-'})")

    lines.append("stages:")
    for stage in manifest.stages:
        status = state.status.get(stage)
        if status == STATUS_COMPLETE and stage not in redo:
            verdict = "skip (complete in the store)"
        elif status == STATUS_COMPLETE:
            verdict = "run (--redo; complete in the store)"
        elif status is not None:
            verdict = f"run (resumes: the store records it {status})"
        else:
            verdict = "run"
        lines.append(f"  {stage:<10} {verdict}")

    lines.extend(_model_lines(manifest, state))
    lines.append("systems:" if manifest.systems else "systems: -")
    for system, fact in zip(manifest.systems, facts):
        if fact is None:
            lines.append(f"  {system.name}: {system.structure} (cannot be read)")
            continue
        cell = "x".join(str(m) for m in system.supercell)
        lines.append(f"  {system.name}: {system.structure}, supercell {cell}, {fact.atoms} atoms, "
                     f"species {', '.join(fact.species)}; target {system.target_species} "
                     f"x {fact.target_count}")

    lines.append("work over the ranks, and store size:")
    total = 0.0
    for stage in manifest.stages:
        work, n_bytes = _stage_plan(stage, manifest, facts, ranks)
        total += n_bytes
        skipped = state.status.get(stage) == STATUS_COMPLETE and stage not in redo
        size = f" [store: ~{_size(n_bytes)}]" if n_bytes else ""
        lines.append(f"  {stage}{' (skipped)' if skipped else ''}: {work}{size}")
    lines.append(f"expected store size: ~{_size(total)} (datasets of every stage listed; "
                 "HDF5 metadata adds a little)")
    return "\n".join(lines)


def _md_bytes(atoms: int, frames: int) -> int:
    """One replica of jobs/stages/md.py create_datasets (f8 positions, cell, 3 per-frame series)."""
    return frames * (atoms * 3 + 9 + 3) * 8 + atoms * 3 * 8 + 512 + 8


def _stage_plan(stage: str, manifest, facts, ranks: int) -> tuple[str, float]:
    """One line describing `stage`'s work split, and the bytes it adds to the store."""
    systems = manifest.systems
    if stage == "probe":
        return "every rank checks MPI, threads and a store write", 0.0
    if stage == "potential":
        spec = manifest.potential
        if spec.frames:
            return (f"rank 0 trains a DP model ({spec.steps} steps, {len(spec.frames)} frames "
                    f"files; the others wait)", 2e6)
        model = spec.model or "the shipped jobs/data/dp-p2-nmmo.pb"
        size = Path(model).stat().st_size if Path(model).is_file() else 0
        return f"rank 0 stores the model {model}", float(size)
    if stage == "learn":
        spec = manifest.learn
        temps = len(spec.explore.temperatures_k)
        return (f"up to {spec.max_iterations} iterations: {spec.models} DP models "
                f"({spec.dp.steps} steps each) one per rank ({min(ranks, spec.models)} at a "
                f"time), {len(systems)} systems x {temps} temperatures = {len(systems) * temps}"
                f" explorations round robin, <= {spec.max_candidates_per_system} + "
                f"{spec.shift.budget_per_iteration} frames labelled per system and iteration "
                f"({manifest.label.labeller}); bootstrap {spec.bootstrap.frames_per_system} "
                f"frames per system", 0.0)
    if stage == "md":
        md = manifest.md
        n_tasks = len(systems) * md.replicas
        n_bytes = sum(_md_bytes(f.atoms, md.frames) * md.replicas for f in facts if f)
        steps = md.equilibration_steps + md.frames * md.save_every_steps
        return (f"{len(systems)} systems x {md.replicas} replicas = {n_tasks} trajectories, "
                f"round robin: {_spread(_round_robin_sizes(n_tasks, ranks))}; {md.frames} "
                f"frames each ({steps} steps, {md.frames * md.save_every_steps * md.timestep_fs:g}"
                f" fs saved); f8 positions+cell+T+E per frame", float(n_bytes))
    if stage == "label":
        spec = manifest.label
        if spec.frames:
            return (f"every frame of {len(spec.frames)} given file(s) (label.frames), taken on "
                    f"demand by {ranks} rank(s) (one {spec.labeller} run each)", 0.0)
        n_bytes, per_system = 0.0, []
        for system, fact in zip(systems, facts):
            candidates = max(0, manifest.md.frames - spec.skip_saved) * manifest.md.replicas
            if spec.selection == "evenly":
                n = min(spec.n_frames, candidates)
            else:
                n = manifest.md.replicas * -(-max(0, manifest.md.frames - spec.skip_saved)
                                             // spec.every_k)
            per_system.append(n)
            if fact:
                n_bytes += n * (fact.atoms * (3 + 3 + 1 + 1) * 8 + 9 * 8 + 4 * 8 + 256 + 512 + 17)
        n = sum(per_system)
        return (f"{n} frames ({', '.join(f'{s.name} {k}' for s, k in zip(systems, per_system))}) "
                f"taken on demand, about {_spread(_block_sizes(n, ranks))} (one "
                f"{spec.labeller} run each)", n_bytes)
    if stage == "train":
        spec = manifest.train
        folds = spec.ensemble_folds or spec.folds
        networks = folds * spec.members_per_fold
        n_features = soap_features(len(spec.species), spec.soap_n_max, spec.soap_l_max)
        if getattr(spec, "model", "nnmr") == "gpr":
            m_final = max(spec.gpr.n_sparse)
            grid = len(spec.gpr.zeta) * len(spec.gpr.regularisation) * len(spec.gpr.n_sparse)
            return (f"sparse GPR: {spec.folds}-fold CV over {grid} hyperparameter set(s), then "
                    f"the final fit; SOAP rows ({n_features} features) computed in contiguous "
                    f"blocks of frames on all {ranks} ranks, kernel blocks over the ranks, "
                    f"reduced collectively; up to {m_final} sparse environments stored in "
                    f"float64", float(m_final * (n_features + 1) * 8))
        widths = [n_features, *spec.hidden_units, 1]
        weights = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
        dtype_bytes = 2 if spec.weights_dtype == "float16" else 4
        share = _spread([len(range(r, spec.batch_size, ranks)) for r in range(ranks)])
        return (f"{folds} folds x {spec.members_per_fold} members = {networks} networks, one "
                f"after the other, each data-parallel over all {ranks} ranks (Horovod); batch of "
                f"{spec.batch_size} rows: {share}; SOAP rows ({n_features} features) computed in "
                f"contiguous blocks of frames", float(networks * weights * dtype_bytes))
    if stage == "infer":
        return _infer_plan(manifest, facts, ranks)
    if stage == "analyze":
        counts = _infer_frames(manifest)
        spec = manifest.analyze
        bins = int(round((spec.histogram_range_ppm[1] - spec.histogram_range_ppm[0])
                         / spec.histogram_bin_ppm))
        n_bytes = len(systems) * 8 * (bins * 8 + spec.map_bins ** 2 * 4 + spec.running_points
                                      * 4 + spec.msd_lags * 3)
        # the site of every target nucleus in every frame (int32)
        n_bytes += sum(4 * (counts[s.name] or 0) * f.target_count
                       for s, f in zip(systems, facts) if f)
        parts = [f"{s.name} {_frames_text(counts[s.name])} frames: "
                 f"{_spread(_block_sizes(counts[s.name], ranks)) if counts[s.name] else '?'}"
                 for s in systems]
        return f"frames in contiguous blocks per system ({'; '.join(parts)})", float(n_bytes)
    if stage == "spectrum":
        spec = manifest.spectrum
        rows = 1 + len(spec.temperatures_k)
        fit = (f"; then the fit of {spec.experiment.file} as a mixture of "
               f"{', '.join(spec.experiment.systems or [s.name for s in systems])}"
               if spec.experiment is not None else "")
        return (f"every rank: exchange line shapes of {len(systems)} system(s) on "
                f"{spec.points} points x {rows} temperature(s){fit}",
                float(len(systems) * spec.points * (rows + 1) * 8))
    if stage == "report":
        return "rank 0 writes the figures and summary.md (outside the store)", 0.0
    return "", 0.0


def _frames_text(n: int | None) -> str:
    return "?" if n is None else str(n)


def _infer_frames(manifest) -> dict:
    """Frames infer takes of each system (None when a file cannot be counted cheaply)."""
    infer = manifest.infer
    counts = {}
    for system in manifest.systems:
        if system.name in infer.trajectories:
            n = count_file_frames(Path(infer.trajectories[system.name]))
            counts[system.name] = None if n is None else \
                max(0, -(-(n - infer.skip_frames) // infer.stride))
        else:
            counts[system.name] = md_frames_per_replica(manifest) * manifest.md.replicas
    return counts


def _infer_plan(manifest, facts, ranks: int) -> tuple[str, float]:
    """infer: chunks of chunk_frames in contiguous blocks; f4 shift + sigma per centre."""
    infer = manifest.infer
    counts = _infer_frames(manifest)
    parts, n_bytes = [], 0.0
    for system, fact in zip(manifest.systems, facts):
        n = counts[system.name]
        if n is None:
            parts.append(f"{system.name}: frames of {infer.trajectories[system.name]} counted "
                         "at run time")
            continue
        chunks = -(-n // infer.chunk_frames)
        parts.append(f"{system.name}: {n} frames = {chunks} chunks of {infer.chunk_frames} "
                     f"(chunks per rank: {_spread(_block_sizes(chunks, ranks))})")
        if fact:
            centres = fact.target_count
            # jobs/stages/infer.py _prepare_group: f4 shift_ppm + shift_std_ppm, f8 centre positions,
            # cell, time, drift; i4 replica; u1 chunk_done
            n_bytes += n * (centres * (4 + 4 + 3 * 8) + 9 * 8 + 8 + 4 + 3 * 8) + chunks
    how = "the DFT labels of the files" if infer.shifts_from == "labels" else "the NN-NMR model"
    return f"shifts from {how}; " + "; ".join(parts), n_bytes
