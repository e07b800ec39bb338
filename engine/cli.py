"""The `dynshift` command: validate a manifest, run it under mpirun, show or report a store."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.failure import EXIT_INPUT
from engine.versions import dynshift_version, package_versions

EXAMPLES = """\
examples:
  dynshift validate run/default.yaml           check a manifest, list every bad field
  mpirun -n 4 dynshift run run/default.yaml    run its stages on 4 ranks (resumes if stopped)
  dynshift run my.yaml --store /scratch/a.h5   the same, with the store somewhere else
  dynshift run my.yaml --redo train infer      re-run stages even if the store has them
  dynshift show dynshift.h5                    stages, status, results and datasets of a store
  dynshift report dynshift.h5                  (re)write the PNG figures and Markdown summary
  dynshift run my.yaml --dry-run --ranks 8     the plan on 8 ranks: stages, work split, size
  dynshift doc label.vasp                      every knob of a section: type, default, meaning

exit status of `dynshift run`:
  0   complete: every stage of the manifest is in the store
  1   a failure (the message names the stage and rank); a rerun resumes
  2   bad input (manifest, files, a damaged store): fix what the message names
  3   another live run holds the store (its lock)
  75  stopped early on SIGTERM / SIGUSR1 / SIGINT at a safe point (a wall-time limit): the
      store is flushed and unlocked; rerun the same command to resume (run/slurm.sbatch does)
"""







def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynshift", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Machine-learned MD to dynamic NMR shifts: one manifest, one mpirun.")
    parser.add_argument("--version", action="store_true", help="print dynshift's version")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("validate", help="validate a manifest and its input files (exit 2 "
                                        "listing every bad field)")
    p.add_argument("manifest", type=Path)
    p.add_argument("--store", type=Path, help="the store the run will use (default: the "
                                              "manifest's)")
    p = sub.add_parser("run", help="run a manifest's stages (launch with mpirun -n N)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("manifest", type=Path)
    p.add_argument("--store", type=Path, help="run store path (overrides the manifest's)")
    p.add_argument("--redo", nargs="+", default=[], metavar="STAGE",
                   help="stages to run again although the store records them complete")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, then print the plan (stages run or skipped, systems, work "
                        "per rank, store size) without running anything or touching the store")
    p.add_argument("--ranks", type=int, metavar="N",
                   help="with --dry-run: plan for N ranks (default: the ranks of this launch)")
    p.add_argument("--stop-grace-s", type=float, default=None, metavar="S",
                   help="after SIGTERM / SIGUSR1 / SIGINT, force the exit (status 75) if no "
                        "safe point is reached within S seconds (default 120; 0: never)")
    p = sub.add_parser("doc", help="print every manifest knob: type, default, docstring")
    p.add_argument("section", nargs="?", help="only this section or knob (e.g. md, label.vasp)")
    p = sub.add_parser("show", help="print a store's stages, status, results and datasets")
    p.add_argument("store", type=Path)
    p = sub.add_parser("report", help="write figures and a Markdown summary from a store")
    p.add_argument("store", type=Path)
    p.add_argument("--out", type=Path, help="output folder (default: <store>-report/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"dynshift {dynshift_version()}")
        return 0
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("dynshift: error: give a command (validate, run, show, report, doc) or --version",
              file=sys.stderr)
        return EXIT_INPUT
    if args.command == "validate":
        return _validate(args.manifest, args.store)
    if args.command == "doc":
        return _doc(args.section)
    if args.command == "run":
        if args.ranks is not None and (args.ranks < 1 or not args.dry_run):
            print("dynshift: --ranks N (N >= 1) goes with --dry-run; a real run takes its ranks "
                  "from mpirun", file=sys.stderr)
            return EXIT_INPUT
        if args.stop_grace_s is not None and args.stop_grace_s < 0:
            print("dynshift run: --stop-grace-s must be >= 0", file=sys.stderr)
            return EXIT_INPUT
        return _run(args.manifest, args.store, tuple(args.redo), dry_run=args.dry_run,
                    ranks=args.ranks, stop_grace_s=args.stop_grace_s)
    if args.command == "show":
        from engine.show import show_store
        return show_store(args.store)
    if args.command == "report":
        if not args.store.is_file():
            print(f"dynshift: no store at {args.store}", file=sys.stderr)
            return EXIT_INPUT
        from engine.stages import stage_module
        from engine.store import StoreDamaged
        try:  # the report stage's own entry, through the stage registry
            print(stage_module("report").report_from_store(args.store, args.out))
        except StoreDamaged as exc:
            print(f"dynshift: {exc}", file=sys.stderr)
            return EXIT_INPUT
        return 0
    return 2


def _validate(path: Path, store_path: Path | None = None) -> int:
    from engine.inputs import load_checked_manifest
    from schemas import ManifestError

    try:
        manifest, _ = load_checked_manifest(path, store_path)
    except ManifestError as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_INPUT
    print(f"{path}: valid; stages {', '.join(manifest.stages)}; "
          f"systems {', '.join(s.name for s in manifest.systems) or '-'}; "
          f"store {store_path or manifest.store}")
    return 0


def _doc(section: str | None) -> int:
    from engine.doc import doc_text, known_sections_text

    try:
        text = doc_text(section)
    except KeyError:
        print(f"dynshift doc: no section or knob {section!r} in the manifest (known: "
              f"{known_sections_text()})", file=sys.stderr)
        return EXIT_INPUT
    print(text)
    return 0


def _dry_run(path: Path, store_path: Path | None, redo: tuple[str, ...],
             ranks: int | None) -> int:
    """Validate and print the plan; nothing runs and the store is neither created nor opened
    for writing. Under mpirun only rank 0 prints (the rank count is the launch's)."""
    rank = 0
    if ranks is None:
        from engine.context import mpi_environment_defaults

        mpi_environment_defaults()
        from mpi4py import MPI

        ranks, rank = MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()
    if rank != 0:
        return 0
    from engine.plan import plan_text
    from schemas import ManifestError

    try:
        manifest, _ = _load_for_run(path, store_path, redo)
    except ManifestError as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_INPUT
    print(plan_text(manifest, Path(store_path or manifest.store), ranks, redo, str(path)))
    return 0


def _load_for_run(path: Path, store_path: Path | None, redo: tuple[str, ...]):
    """The validated manifest and its text; `--redo` names must be stages of it.

    Raises
    ------
    ManifestError
        For a bad manifest or an unknown `--redo` stage.
    """
    from engine.inputs import load_checked_manifest
    from schemas import ManifestError

    manifest, text = load_checked_manifest(path, store_path)
    unknown = [s for s in redo if s not in manifest.stages]
    if unknown:
        raise ManifestError(str(path), [f"--redo: {s} is not a stage of this manifest"
                                        for s in unknown])
    return manifest, text


def _run(path: Path, store_path: Path | None, redo: tuple[str, ...], dry_run: bool = False,
         ranks: int | None = None, stop_grace_s: float | None = None) -> int:
    if dry_run:
        return _dry_run(path, store_path, redo, ranks)
    from engine import stop
    from engine.context import RankContext, mpi_environment_defaults

    stop.install(stop.DEFAULT_GRACE_S if stop_grace_s is None else stop_grace_s)
    mpi_environment_defaults()  # before MPI_Init
    from mpi4py import MPI

    comm = MPI.COMM_WORLD  # the one place the world communicator is named; passed on from here
    ctx = RankContext.from_comm(comm)
    loaded = None
    if ctx.is_root:
        from schemas import ManifestError
        try:
            manifest, text = _load_for_run(path, store_path, redo)
            loaded = (manifest, text, None, package_versions())
        except ManifestError as exc:
            loaded = (None, None, exc.report(), None)
    manifest, text, error, versions = comm.bcast(loaded, root=0)
    if error is not None:
        if ctx.is_root:
            print(error, file=sys.stderr)
        return EXIT_INPUT
    return run_manifest(manifest, text, ctx, store_path or manifest.store, versions, redo)


def run_manifest(manifest, text: str, ctx, store_path: Path, versions: dict | None = None,
                 redo: tuple[str, ...] = ()) -> int:
    """Run a validated manifest on the ranks of `ctx` with the store at `store_path`.

    Before the store is opened, rank 0 takes the store's lock (engine/lock.py) and checks an
    existing store for damage; the verdict reaches every rank, so all return together.

    Returns
    -------
    int
        0; :data:`engine.lock.EXIT_STORE_HELD` (3) when another live run holds the store;
        2 when the store exists but is damaged (the file is left as it was).
    """
    from engine.driver import record_run, run_stages
    from engine.failure import fail_all_ranks
    from engine.lock import EXIT_STORE_HELD, StoreHeld, StoreLock
    from engine.store import RunStore, StoreDamaged, check_store, recover_interrupted

    store_path = Path(store_path)
    lock, refusal = None, None
    if ctx.is_root:
        try:
            store_path.parent.mkdir(parents=True, exist_ok=True)
            lock = StoreLock.acquire(store_path, log=ctx.log)
            restored = recover_interrupted(store_path)  # a kill inside a transaction
            if restored:
                ctx.log(restored)
            check_store(store_path)
        except StoreHeld as exc:
            refusal = (EXIT_STORE_HELD, str(exc))
        except StoreDamaged as exc:
            refusal = (EXIT_INPUT, str(exc))
        except OSError as exc:
            refusal = (EXIT_INPUT, f"cannot take the lock of store {store_path}: {exc}")
        except Exception as exc:  # noqa: BLE001 - the other ranks wait in the bcast below
            refusal = (1, f"taking the lock of store {store_path} failed: "
                          f"{type(exc).__name__}: {exc}")
        if refusal is not None and lock is not None:
            lock.release()
            lock = None
    refusal = ctx.comm.bcast(refusal, root=0)
    if refusal is not None:
        if ctx.is_root:
            print(f"dynshift: {refusal[1]}", file=sys.stderr, flush=True)
        return refusal[0]
    try:
        try:
            store = RunStore(store_path, ctx)
        except Exception as exc:  # noqa: BLE001
            fail_all_ranks(ctx.comm, "open store", exc)
            return 1
        with store:
            previous = store.attrs("/").get("manifest_yaml")
            if previous is not None and previous != text and ctx.is_root:
                ctx.warn(f"{store_path} was made with another manifest; stages it records "
                         "complete are kept (use --redo STAGE to run them again)")
            ctx.log(f"{ctx.size} rank(s), {ctx.cores} core(s) per rank, store {store_path}")
            record_run(store, ctx, text, versions or package_versions())
            status = run_stages(manifest, ctx, store, force=redo)
    finally:  # a clean end or a failure that unwinds; after MPI_Abort the lock goes stale
        if lock is not None:
            lock.release()
    if status:
        ctx.log(f"stopped early (exit status {status}); the store is unlocked; resume with the "
                f"same command; inspect with: dynshift show {store_path}")
        return status
    ctx.log(f"done; inspect with: dynshift show {store_path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
