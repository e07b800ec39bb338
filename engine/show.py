"""`dynshift show STORE`: a plain-text look into a run store (serial, read-only)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py

from engine.store import _decode


def show_store(path: Path) -> int:
    """Print a store's run record, stages with status and results, and every dataset."""
    if not Path(path).is_file():
        print(f"dynshift: no store at {path}", file=sys.stderr)
        return 2
    with h5py.File(path, "r", locking=False) as f:
        root = {k: _decode(v) for k, v in f.attrs.items()}
        print(f"store {path}  (layout {root.get('layout', '?')}, last run on "
              f"{root.get('ranks', '?')} rank(s), {len(root.get('invocations', []))} invocation(s))")
        versions = root.get("versions") or {}
        if versions:
            print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        print("\nstages:")
        for name, group in f.get("stages", {}).items():
            attrs = {k: _decode(v) for k, v in group.attrs.items()}
            elapsed = attrs.get("elapsed_s")
            took = f"{elapsed:9.1f} s" if isinstance(elapsed, (int, float)) else " " * 11
            print(f"  {name:10s} {attrs.get('status', '?'):9s} {took}  "
                  f"{json.dumps(attrs.get('summary', {}), default=str)}")
        print("\ndatasets:")

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                unit = obj.attrs.get("unit", "")
                unit = unit.decode() if isinstance(unit, bytes) else unit
                print(f"  /{name:60s} {str(obj.shape):18s} {obj.dtype}  {unit}")
        f.visititems(visit)
    return 0
