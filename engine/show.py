"""`dynshift show STORE`: a plain-text look into a run store (serial, read-only)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py

from engine.failure import EXIT_INPUT
from engine.lock import judge, lock_path_of
from engine.store import _decode, store_damage

MISMATCH = "MISMATCH, numbers may differ"
"""The words that mark a package whose installed version is not the one the store recorded."""


def version_lines(recorded: dict, installed: dict) -> list[str]:
    """One line per package the store recorded: its version, and the installed one if it differs.

    ``numpy 2.1.0 (installed 2.2.1: MISMATCH, numbers may differ)``; a package recorded but not
    installed here is a mismatch too.
    """
    lines = []
    for name, version in sorted(recorded.items()):
        here = installed.get(name)
        if here is None:
            lines.append(f"{name} {version} (not installed here: {MISMATCH})")
        elif str(here) != str(version):
            lines.append(f"{name} {version} (installed {here}: {MISMATCH})")
        else:
            lines.append(f"{name} {version}")
    return lines


def lock_note(path: Path) -> str | None:
    """A line about the store's lock file, if there is one (a live run, or a dead one's)."""
    judgement = judge(lock_path_of(Path(path).absolute()))
    if judgement is None:
        return None
    who = judgement.holder.describe() if judgement.holder is not None else "unreadable lock"
    if judgement.verdict == "stale":
        return (f"lock: left by a run that died ({who}; {judgement.why}); the next "
                "`dynshift run` takes it over")
    return f"lock: held by a running dynshift run ({who}); what follows may change meanwhile"


def show_store(path: Path, installed: dict | None = None) -> int:
    """Print a store's run record, versions, stages with status and results, and every dataset.

    Parameters
    ----------
    path
        The store; it is checked first (exit 2 with one line when it is damaged).
    installed
        Package versions installed here (default: :func:`engine.versions.package_versions`).

    Returns
    -------
    int
        The exit status: 0, or 2 for a missing or damaged store.
    """
    path = Path(path)
    if not path.is_file():
        print(f"dynshift: no store at {path}", file=sys.stderr)
        return EXIT_INPUT
    note = lock_note(path)
    reason = store_damage(path)
    if reason is not None:
        if note is not None and note.startswith("lock: held"):
            print(f"dynshift: store {path} could not be read while a live run writes it: "
                  f"{reason}; {note[len('lock: '):]}; nothing was changed", file=sys.stderr)
        else:
            print(f"dynshift: store {path} is damaged: {reason}; nothing was changed",
                  file=sys.stderr)
        return EXIT_INPUT
    if installed is None:
        from engine.versions import package_versions
        installed = package_versions()
    with h5py.File(path, "r", locking=False) as f:
        root = {k: _decode(v) for k, v in f.attrs.items()}
        print(f"store {path}  (layout {root.get('layout', '?')}, last run on "
              f"{root.get('ranks', '?')} rank(s), {len(root.get('invocations', []))} invocation(s))")
        if note is not None:
            print(note)
        versions = root.get("versions") or {}
        if versions:
            lines = version_lines(versions, installed)
            n_bad = sum(MISMATCH in line for line in lines)
            print(f"\nversions recorded by the run that made the store (vs installed here: "
                  f"{n_bad or 'no'} mismatch{'es' if n_bad != 1 else ''}):")
            for line in lines:
                print(f"  {line}")
        print("\nstages:")
        for name, group in f.get("stages", {}).items():
            attrs = {k: _decode(v) for k, v in group.attrs.items()}
            elapsed = attrs.get("elapsed_s")
            took = f"{elapsed:9.1f} s" if isinstance(elapsed, (int, float)) else " " * 11
            print(f"  {name:10s} {attrs.get('status', '?'):9s} {took}  "
                  f"{json.dumps(attrs.get('summary', {}), default=str)}")
            if attrs.get("status") == "stopped":
                print(f"  {'':10s} stopped on {attrs.get('signal') or 'a signal'} "
                      f"{attrs.get('stopped_at', '')}; rerun the same command to resume")
        has_campaign = "learn" in f
    from engine.store import RunStore
    from jobs.layouts.spectrum import fit_lines, fit_record

    reader = RunStore(path, None, mode="r")
    try:
        fit = fit_record(reader)
        if fit is not None:
            print(f"\nspectrum fit of {fit.get('source')} (fractions: posterior mean +- sd, "
                  "95% interval; docs/spectrum.md):")
            for line in fit_lines(fit):
                print(f"  {line}")
        if has_campaign:
            from jobs.layouts.learn import campaign_lines

            print("\nlearn campaign (concurrent learning; docs/learn.md):")
            for line in campaign_lines(reader):
                print(f"  {line}")
    finally:
        reader.close()

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            unit = obj.attrs.get("unit", "")
            unit = unit.decode() if isinstance(unit, bytes) else unit
            print(f"  /{name:60s} {str(obj.shape):18s} {obj.dtype}  {unit}")
    print("\ndatasets:")
    with h5py.File(path, "r", locking=False) as f:
        f.visititems(visit)
    return 0
