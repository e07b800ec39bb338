"""An explored pool for the selection learning curve (docs/gpr.md, `bench_gpr.py curve --frames`).

Every saved exploration frame of a learn store (all iterations and temperatures of one system),
subsampled evenly to ``--frames`` frames, labelled by the `model` labeller: an ORACLE (by
default the shipped DP and the shipped NN-NMR shift model, a network on 5.5 A SOAP that the
GPR student cannot fit exactly), never DFT. Written as extended XYZ::

    .venv/bin/python benchmarks/explored_pool.py learn-oracle-p6322.h5 pool.extxyz --system p6322
    .venv/bin/python benchmarks/bench_gpr.py curve --frames pool.extxyz --r-cut 8.5 --n-max 10 \\
        --zeta 1 --regularisation 1e-6 --n-sparse 3000 --no-tune --sizes 25 50 100 200 \\
        --curves random reduction --selection-regularisation 1e-2
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    from ase import Atoms
    from ase.io import write

    from jobs.labellers.model import ModelLabeller
    from jobs.shift import ppm_per_mhz
    from schemas.potential import SHIPPED_MODEL
    from schemas.shift import ShiftSpec

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store")
    parser.add_argument("out")
    parser.add_argument("--system", default="p6322")
    parser.add_argument("--frames", type=int, default=800)
    parser.add_argument("--dp-model", default=str(SHIPPED_MODEL))
    parser.add_argument("--shift-model", default=str(ROOT / "jobs" / "data" / "nnmr-p2-nmmo.h5"))
    args = parser.parse_args(argv)

    if not Path(args.store).is_file():
        print(f"explored_pool: no store {args.store}", file=sys.stderr)
        sys.exit(2)
    explored = []
    with h5py.File(args.store, "r") as store:
        learn = store["learn"]
        numbers = learn[f"iter_000/label/{args.system}/numbers"][()]
        for name in sorted(k for k in learn if k.startswith("iter_")):
            group = learn.get(f"{name}/explore/{args.system}")
            if group is None:
                continue
            positions, cells = group["positions_a"][()], group["cell_a"][()]
            for t in range(positions.shape[0]):
                for s in range(positions.shape[1]):  # unsaved slots are all zero
                    if np.all(np.isfinite(positions[t, s])) and np.any(positions[t, s] != 0):
                        explored.append((name, t, s, positions[t, s], cells[t, s]))
    picks = np.linspace(0, len(explored) - 1, min(args.frames, len(explored))).round().astype(int)
    labeller = ModelLabeller(Path(args.dp_model), Path(args.shift_model), ppm_per_mhz(ShiftSpec()))
    frames = []
    with tempfile.TemporaryDirectory() as work:
        for index in picks:
            name, t, s, positions, cell = explored[index]
            atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=True)
            frame = labeller.label(atoms, Path(work) / str(index), f"{name} T{t} s{s}")
            couplings = frame.arrays["fermi_contact_mhz"]
            couplings[~np.isfinite(couplings)] = 0.0  # not computed for non-target atoms
            frame.info.update(iteration=name, temperature_index=int(t), saved=int(s))
            frames.append(frame)
    write(args.out, frames, format="extxyz")
    print(f"{len(explored)} explored frames, {len(frames)} labelled by the oracle -> {args.out}")


if __name__ == "__main__":
    main()
