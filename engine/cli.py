"""The `dynshift` command: validate a manifest, run it under mpirun, show or report a store."""
from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from engine.failure import EXIT_INPUT

EXAMPLES = """\
examples:
  dynshift validate run/default.yaml           check a manifest, list every bad field
  mpirun -n 4 dynshift run run/default.yaml    run its stages on 4 ranks (resumes if stopped)
  dynshift run my.yaml --store /scratch/a.h5   the same, with the store somewhere else
  dynshift run my.yaml --redo train infer      re-run stages even if the store has them
  dynshift show dynshift.h5                    stages, status, results and datasets of a store
  dynshift report dynshift.h5                  (re)write the PNG figures and Markdown summary
"""

PACKAGES = ("dynshift", "numpy", "h5py", "mpi4py", "pydantic", "ase", "dscribe", "deepmd-kit",
            "tensorflow-cpu", "tensorflow", "keras", "horovod")


def package_versions() -> dict:
    """Versions of the packages a run's numbers depend on (recorded in the store)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynshift", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Machine-learned MD to dynamic NMR shifts: one manifest, one mpirun.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="validate a manifest (exit 2 listing every bad field)")
    p.add_argument("manifest", type=Path)
    p = sub.add_parser("run", help="run a manifest's stages (launch with mpirun -n N)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("manifest", type=Path)
    p.add_argument("--store", type=Path, help="run store path (overrides the manifest's)")
    p.add_argument("--redo", nargs="+", default=[], metavar="STAGE",
                   help="stages to run again although the store records them complete")
    p = sub.add_parser("show", help="print a store's stages, status, results and datasets")
    p.add_argument("store", type=Path)
    p = sub.add_parser("report", help="write figures and a Markdown summary from a store")
    p.add_argument("store", type=Path)
    p.add_argument("--out", type=Path, help="output folder (default: <store>-report/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return _validate(args.manifest)
    if args.command == "run":
        return _run(args.manifest, args.store, tuple(args.redo))
    if args.command == "show":
        from engine.show import show_store
        return show_store(args.store)
    if args.command == "report":
        if not args.store.is_file():
            print(f"dynshift: no store at {args.store}", file=sys.stderr)
            return EXIT_INPUT
        from jobs.report import report_from_store
        print(report_from_store(args.store, args.out))
        return 0
    return 2


def _validate(path: Path) -> int:
    from schemas import ManifestError, load_manifest

    try:
        manifest, _ = load_manifest(path)
    except ManifestError as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_INPUT
    print(f"{path}: valid; stages {', '.join(manifest.stages)}; "
          f"systems {', '.join(s.name for s in manifest.systems) or '-'}; store {manifest.store}")
    return 0


def _run(path: Path, store_path: Path | None, redo: tuple[str, ...]) -> int:
    from engine.context import RankContext, mpi_environment_defaults

    mpi_environment_defaults()  # before MPI_Init
    from mpi4py import MPI

    comm = MPI.COMM_WORLD  # the one place the world communicator is named; passed on from here
    ctx = RankContext.from_comm(comm)
    loaded = None
    if ctx.is_root:
        from schemas import ManifestError, load_manifest
        try:
            manifest, text = load_manifest(path)
            unknown = [s for s in redo if s not in manifest.stages]
            if unknown:
                raise ManifestError(str(path), [f"--redo: {s} is not a stage of this manifest"
                                                for s in unknown])
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
    """Run a validated manifest on the ranks of `ctx` with the store at `store_path`."""
    from engine.driver import record_run, run_stages
    from engine.failure import fail_all_ranks
    from engine.store import RunStore

    try:
        store_path = Path(store_path)
        if ctx.is_root:
            store_path.parent.mkdir(parents=True, exist_ok=True)
        ctx.comm.Barrier()
        store = RunStore(store_path, ctx)
    except Exception as exc:  # noqa: BLE001
        fail_all_ranks(ctx.comm, "open store", exc)
        return 1
    with store:
        previous = store.attrs("/").get("manifest_yaml")
        if previous is not None and previous != text and ctx.is_root:
            ctx.warn(f"{store_path} was made with another manifest; stages it records complete "
                     "are kept (use --redo STAGE to run them again)")
        ctx.log(f"{ctx.size} rank(s), {ctx.cores} core(s) per rank, store {store_path}")
        record_run(store, ctx, text, versions or package_versions())
        run_stages(manifest, ctx, store, force=redo)
    ctx.log(f"done; inspect with: dynshift show {store_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
