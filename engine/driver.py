"""The stage driver: runs the manifest's stages in order, records each completion, resumes."""
from __future__ import annotations

import json
import time

from engine.context import RankContext
from engine.failure import fail_all_ranks
from engine.stages import StageInputs, StageResult, stage_module, stage_spec
from engine.stop import EXIT_RESUME, StopRequested
from engine.store import STATUS_COMPLETE, STATUS_RUNNING, STATUS_STOPPED, RunStore

__all__ = ["StageResult", "StageInputs", "record_run", "run_stages", "stage_function"]


def stage_function(name: str):
    """The `run(spec, inputs)` entry of stage `name` (imported only when that stage runs)."""
    return stage_module(name).run


def record_run(store: RunStore, ctx: RankContext, manifest_text: str, versions: dict) -> None:
    """Record this invocation in the store's root attributes and its run log (collective).

    The root attribute ``versions`` keeps the package versions of the run that made the store
    (its numbers); an invocation with other versions is warned about and lists its changes in
    its own ``invocations`` entry, so ``dynshift show`` compares against the first.
    """
    root = store.attrs("/")
    runs = root.get("invocations", [])
    entry = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ranks": ctx.size}
    recorded = root.get("versions") or {}
    changed = {name: [recorded.get(name), version] for name, version in versions.items()
               if recorded and recorded.get(name) != version}
    if changed:
        entry["versions_changed"] = changed
        ctx.log("warning: this store was made with other package versions ("
                + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(changed.items()))
                + "); resumed stages may differ in the last digits")
    runs.append(entry)
    with store.transaction():
        store.set_attrs("/", manifest_yaml=manifest_text, versions=recorded or versions,
                        ranks=ctx.size, invocations=runs, layout="dynshift-store/1")


def run_stages(manifest, ctx: RankContext, store: RunStore, force: tuple[str, ...] = ()) -> int:
    """Run every stage of the manifest in order, skipping those the store records complete.

    Returns 0, or :data:`engine.stop.EXIT_RESUME` when a signal stopped a stage at a safe
    point (every rank together): the stage is recorded ``stopped`` with where, the store
    flushed, and the stages after it are not started."""
    inputs = StageInputs.from_manifest(manifest, ctx, store)
    for name in manifest.stages:
        if store.stage_status(name) == STATUS_COMPLETE and name not in force:
            ctx.log(f"stage {name}: complete in the store, skipped")
            continue
        ctx.log(f"stage {name}: start")
        store.mark_stage(name, STATUS_RUNNING, ranks=ctx.size)
        start = time.monotonic()
        try:
            result = stage_function(name)(stage_spec(manifest, name), inputs)
        except StopRequested as stop:
            store.mark_stage(name, STATUS_STOPPED, stopped_at=stop.where,
                             signal=stop.signal_name or "",
                             elapsed_s=round(time.monotonic() - start, 3))
            store.flush()
            ctx.log(f"stage {name}: stopped on {stop.signal_name} {stop.where}; the store is "
                    f"flushed: rerun the same command to resume (exit status {EXIT_RESUME})")
            return EXIT_RESUME
        except BaseException as exc:  # noqa: BLE001 - every failure must end every rank
            fail_all_ranks(ctx.comm, name, exc)
            raise
        elapsed = time.monotonic() - start
        if not isinstance(result, StageResult):
            raise TypeError(f"stage {name} returned {type(result).__name__}, not a StageResult")
        summary = result.summary()
        store.mark_stage(name, STATUS_COMPLETE, elapsed_s=round(elapsed, 3),
                         summary=json.loads(json.dumps(summary, default=float)))
        ctx.log(f"stage {name}: complete in {elapsed:.1f} s {_brief(summary)}")
    return 0


def _brief(summary: dict) -> str:
    items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in summary.items() if isinstance(v, (int, float, str))]
    return ("(" + ", ".join(items[:6]) + ")") if items else ""
