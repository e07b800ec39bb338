"""Kill soak: SIGKILL a `dynshift run` at many moments over every stage; it must resume exactly.

    .venv/bin/python benchmarks/soak_kill.py                  # 30 kills, mpirun -n 2
    .venv/bin/python benchmarks/soak_kill.py --kills 6 --workdir /tmp/soak

A small manifest (probe, md of two builtin systems with 200 frames in chunks of 20, infer in
chunks of 32, analyze, report) is run once to warm numba's and matplotlib's caches, then once
more, uninterrupted: the reference, whose stage timeline (from its stdout) sets where the kills
go. The kills are spread over the stages of that
timeline (each stage, and the start-up before the first, gets a share proportional to its time
and at least two; stratified random moments inside it), then dealt round robin to `--chains`
chains. A chain starts a fresh store and, kill after kill, runs `mpirun -n R dynshift run`,
waits until the aimed stage has run as long as the moment says (less what an earlier kill of
that chain in the same stage already covered), and SIGKILLs every process of the run's session
(mpirun and its ranks: Open MPI puts every rank in a process group of its own). It records the
stage running then (the run's last `stage X: start` line) and whether a rank was inside a
write, pwrite or fsync system call on the store (a flush; every other kill aimed at md, infer or
analyze waits up to 3 s for one, watching /proc/<pid>/syscall), checks that `dynshift show` opens the store
(exit 0) and starts the next run, which must take over the dead run's lock. After its last kill
a chain's run goes to the end: exit 0 and the same bytes as the reference in every dataset
under /infer and /analyze (and /md, shown apart). A kill that leaves a damaged store is counted
(the store is kept as damaged-K.h5) and the chain goes on from a fresh store. Prints one row per
kill and a summary; exits 1 when any check fails.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MANIFEST = """\
stages: [probe, md, infer, analyze, report]
store: soak.h5
seed: 11
systems:
  - {name: p63mcm, structure: "builtin:p2-nmmo-p63mcm"}
  - {name: p6322, structure: "builtin:p2-nmmo-p6322"}
md:
  replicas: 1
  equilibration_steps: 40
  frames: 200
  save_every_steps: 2
  chunk_frames: 20
infer:
  chunk_frames: 32
analyze:
  chunk_frames: 64
"""
"""The soak's manifest: every stage of the demo, small, with many chunks (many flushes)."""

COMPARED = ("/infer", "/analyze")
"""Groups whose datasets must be byte-identical to the reference run's."""

WRITE_SYSCALLS = {1: "write", 18: "pwrite", 20: "writev", 296: "pwritev", 328: "pwritev2",
                  74: "fsync", 75: "fdatasync", 77: "ftruncate"}
"""x86-64 system call numbers that mean a rank is writing or flushing at the kill."""

FLUSHING_STAGES = ("md", "infer", "analyze")
"""Stages that flush the store after every chunk; every other kill aimed at them waits (at
most FLUSH_WATCH_S) until a rank is inside a write or fsync system call."""
FLUSH_WATCH_S = 3.0

STAGE_LINE = re.compile(r"stage (\w+): (start|complete)")


def mpi_environment() -> dict:
    """The environment for mpirun: the test suite's settings unless the caller set them."""
    env = dict(os.environ)
    defaults = {"OMPI_MCA_rmaps_base_oversubscribe": "1", "HDF5_USE_FILE_LOCKING": "FALSE",
                "OMPI_MCA_btl_vader_single_copy_mechanism": "none", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if os.geteuid() == 0:
        defaults.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def session_members(sid: int) -> list[int]:
    """Pids of every process in session `sid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                pids.append(int(entry.name))
    return pids


def in_write(pids: list[int], suffix: str = ".h5") -> str:
    """The write-like system call any of `pids` is inside now on a file named *`suffix`* (the
    store, not a log pipe), or '-'."""
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/syscall").read_text().split()
            if not fields[0].isdigit() or int(fields[0]) not in WRITE_SYSCALLS:
                continue
            target = os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}")
        except (OSError, IndexError, ValueError):
            continue
        if target.endswith(suffix):
            return WRITE_SYSCALLS[int(fields[0])]
    return "-"


class Run:
    """One `mpirun -n R dynshift run` in a session of its own, its stdout lines timed."""

    def __init__(self, command: list[str], cwd: Path, env: dict):
        self.start = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic() - self.start, line.rstrip("\n")))

    def stage_now(self) -> str:
        """The stage running now by the run's stdout: 'md', 'after md', or 'start-up'."""
        stage = "start-up"
        for _, line in list(self.lines):
            match = STAGE_LINE.search(line)
            if match:
                stage = match.group(1) if match.group(2) == "start" else f"after {match.group(1)}"
        return stage

    def kill(self, in_flush_within_s: float = 0.0) -> tuple[str, str]:
        """SIGKILL the whole session; returns (stage then, write system call then).

        With `in_flush_within_s`, first watch the ranks' system calls (every ~0.5 ms) for up
        to that long and kill the moment one is inside a write or fsync (a chunk's flush).
        """
        members = session_members(self.process.pid)
        io = in_write(members)
        end = time.monotonic() + in_flush_within_s
        while io == "-" and time.monotonic() < end and self.process.poll() is None:
            time.sleep(0.0005)
            io = in_write(members)
        stage = self.stage_now()
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=60)
        end = time.monotonic() + 30
        while session_members(self.process.pid) and time.monotonic() < end:
            time.sleep(0.05)  # ranks re-parented to init must be gone before the rerun
        self._reader.join(timeout=10)
        return stage, io

    def wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def timeline(run: Run, total_s: float) -> list[tuple[str, float, float]]:
    """(stage, start, end) windows of a finished run, 'start-up' first."""
    starts = [(m.group(1), t) for t, line in run.lines
              if (m := STAGE_LINE.search(line)) and m.group(2) == "start"]
    windows, previous = [], ("start-up", 0.0)
    for name, t in starts:
        windows.append((previous[0], previous[1], t))
        previous = (name, t)
    windows.append((previous[0], previous[1], total_s))
    return windows


def kill_moments(windows, n_kills: int, rng: random.Random) -> list[tuple[float, str]]:
    """`n_kills` moments: per window a share by its length (at least 2), stratified inside."""
    total = sum(end - start for _, start, end in windows)
    shares = [max(2, round(n_kills * (end - start) / total)) for _, start, end in windows]
    while sum(shares) > n_kills and max(shares) > 2:
        shares[shares.index(max(shares))] -= 1
    while sum(shares) < n_kills:
        lengths = [end - start for _, start, end in windows]
        shares[lengths.index(max(lengths))] += 1
    moments = []
    for (name, start, end), share in zip(windows, shares):
        for k in range(share):
            moments.append((start + (end - start) * (k + rng.random()) / share, name))
    return sorted(moments)


def datasets(path: Path, groups=COMPARED) -> dict[str, tuple[str, tuple, bytes]]:
    """Every dataset under `groups`: name -> (dtype, shape, raw bytes)."""
    import h5py

    found = {}
    with h5py.File(path, "r", locking=False) as f:
        for group in groups:
            if group not in f:
                continue

            def visit(name, obj, group=group):
                if isinstance(obj, h5py.Dataset):
                    data = obj[()]
                    found[f"{group}/{name}"] = (obj.dtype.str, obj.shape,
                                                data.tobytes() if hasattr(data, "tobytes")
                                                else bytes(data))
            f[group].visititems(visit)
    return found


def chain_plan(moments: list[tuple[float, str]], windows, n_chains: int):
    """Deal the sorted kill moments to `n_chains` chains (round robin, so every chain walks the
    whole timeline) and turn each into waits: (stage to wait for, seconds after its start)."""
    starts = {name: start for name, start, _ in windows}
    chains = [moments[c::n_chains] for c in range(n_chains)]
    plans = []
    for chain in chains:
        plan, previous = [], None
        for moment, stage in chain:
            offset = moment - starts[stage]
            resumes = stage in FLUSHING_STAGES  # continues from its last chunk; others restart
            done = (previous[1] if resumes and previous is not None and previous[0] == stage
                    else 0.0)
            plan.append((stage, max(0.0, offset - done), moment))
            previous = (stage, offset)
        plans.append(plan)
    return plans


def wait_until(run: Run, stage: str, delay_s: float) -> bool:
    """Wait until `delay_s` after `stage` started in `run` (after launch for 'start-up');
    False when the run ended first."""
    began = None
    while run.process.poll() is None:
        now = time.monotonic() - run.start
        if stage == "start-up":
            began = 0.0
        elif began is None:
            for t, line in list(run.lines):
                match = STAGE_LINE.search(line)
                if match and match.group(2) == "start" and match.group(1) == stage:
                    began = t
                    break
                if match and match.group(2) == "start" and (
                        STAGES.index(match.group(1)) > STAGES.index(stage)):
                    began = now - delay_s  # that stage was skipped: kill now
                    break
        if began is not None and now >= began + delay_s:
            return True
        time.sleep(0.005)
    return False


STAGES = ("start-up", "probe", "md", "infer", "analyze", "report")


def identical(path: Path, want: dict, groups=COMPARED) -> bool:
    """True when the datasets under `groups` of the store at `path` are `want`, byte for byte."""
    got = datasets(path, groups)
    return got.keys() == want.keys() and all(got[k] == want[k] for k in want)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--chains", type=int, default=5,
                        help="fresh stores; each is killed kills/chains times, then finished")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2022, help="seed of the kill moments")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dynshift-soak"))
    parser.add_argument("--dynshift", type=Path, default=Path(sys.executable).parent / "dynshift")
    args = parser.parse_args()

    env = mpi_environment()
    workdir = args.workdir.absolute()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    (workdir / "m.yaml").write_text(MANIFEST)
    command = ["mpirun", "-n", str(args.ranks), str(args.dynshift), "run", "m.yaml"]
    began = time.monotonic()

    reference_dir = workdir / "reference"
    reference_dir.mkdir()
    shutil.copy(workdir / "m.yaml", reference_dir)
    warm_dir = workdir / "warm-up"  # fills numba's and matplotlib's caches: later runs are
    warm_dir.mkdir()                 # faster than a first one, and the timeline is theirs
    shutil.copy(workdir / "m.yaml", warm_dir)
    if Run(command, warm_dir, env).wait(1200) != 0:
        print("soak: the warm-up run failed", file=sys.stderr)
        return 1
    shutil.rmtree(warm_dir)
    reference = Run(command, reference_dir, env)
    if reference.wait(1200) != 0:
        print(reference.text())
        print("soak: the reference run failed", file=sys.stderr)
        return 1
    reference_s = reference.lines[-1][0]
    windows = timeline(reference, reference_s)
    print(f"reference run: {reference_s:.1f} s; " + ", ".join(
        f"{name} {end - start:.1f} s" for name, start, end in windows), flush=True)
    want = datasets(reference_dir / "soak.h5")
    want_md = datasets(reference_dir / "soak.h5", ("/md",))

    moments = kill_moments(windows, args.kills, random.Random(args.seed))
    plans = chain_plan(moments, windows, args.chains)
    print(f"{'chain':>5} {'#':>3} {'aim s':>6} {'aimed at':9} {'killed in':11} {'syscall':8} "
          f"{'lock':5} {'show':4} {'took over':9}", flush=True)
    rows, failures, current = [], 0, None
    try:
        for c, plan in enumerate(plans):
            folder = workdir / f"chain{c}"
            folder.mkdir()
            shutil.copy(workdir / "m.yaml", folder)
            lock_before = False
            for k, (stage, delay_s, moment) in enumerate(plan):
                current = run = Run(command, folder, env)
                if not wait_until(run, stage, delay_s):
                    code = run.wait(60)
                    same = code == 0 and identical(folder / "soak.h5", want)
                    print(f"{c:5d} {k:3d} {moment:6.1f} {stage:9} ended first (exit {code}, "
                          f"identical: {'yes' if same else 'NO'})",
                          flush=True)
                    failures += not same
                    if (folder / "soak.h5").exists() and k < len(plan) - 1:
                        (folder / "soak.h5").rename(folder / f"finished-{k}.h5")
                    lock_before = False
                    continue
                flush = FLUSH_WATCH_S if stage in FLUSHING_STAGES and k % 2 else 0.0
                killed_in, io = run.kill(flush)
                took_over = "took over the stale lock" in run.text()
                lock_ok = not lock_before or took_over or killed_in == "start-up"
                lock_before = (folder / "soak.h5.lock").exists()
                shown = subprocess.run([str(args.dynshift), "show", "soak.h5"], cwd=folder,
                                       env=env, capture_output=True, text=True)
                show_ok = shown.returncode == 0 or not (folder / "soak.h5").exists()
                failures += not (show_ok and lock_ok)
                damaged = "is damaged" in shown.stderr
                rows.append((killed_in, io, damaged))
                print(f"{c:5d} {k:3d} {moment:6.1f} {stage:9} {killed_in:11} {io:8} "
                      f"{'left' if lock_before else '-':5} {shown.returncode:4d} "
                      f"{'yes' if took_over else '-':9}" + ("" if show_ok else
                                                             f"  {shown.stderr.strip()}"),
                      flush=True)
                if damaged:  # kept for a look; the chain goes on from a fresh store
                    (folder / "soak.h5").rename(folder / f"damaged-{k}.h5")
                    (folder / "soak.h5.lock").unlink(missing_ok=True)
                    lock_before = False
                    print(f"      the kill left a damaged store (kept as "
                          f"{folder / f'damaged-{k}.h5'}); the chain starts a fresh store",
                          flush=True)
            current = run = Run(command, folder, env)
            code = run.wait(1200)
            took_over = "took over the stale lock" in run.text()
            same = same_md = False
            if code == 0:
                same = identical(folder / "soak.h5", want)
                same_md = identical(folder / "soak.h5", want_md, ("/md",))
            ok = code == 0 and same and (took_over or not lock_before)
            failures += not ok
            print(f"chain {c}: final run exit {code}, took over {'yes' if took_over else '-'}, "
                  f"/infer + /analyze identical to the reference: {'yes' if same else 'NO'} "
                  f"(/md: {'yes' if same_md else 'NO'})", flush=True)
            if not ok:
                print(run.text()[-1500:], flush=True)
            current = None
    finally:
        if current is not None and current.process.poll() is None:
            current.kill()

    per_stage: dict[str, int] = {}
    for stage, _, _ in rows:
        per_stage[stage] = per_stage.get(stage, 0) + 1
    in_io = sum(io != "-" for _, io, _ in rows)
    damaged = [(stage, io) for stage, io, bad in rows if bad]
    print("\nkills per stage: " + ", ".join(f"{k} {v}" for k, v in per_stage.items()))
    print(f"kills inside a write/fsync system call on the store: {in_io} of {len(rows)}")
    print(f"kills that left a damaged store: {len(damaged)} of {len(rows)}"
          + (" (" + ", ".join(f"{s} {io}" for s, io in damaged) + ")" if damaged else ""))
    print(f"every store opened after its kill, every lock taken over, every chain identical to "
          f"the reference (/infer, /analyze): {'yes' if failures == 0 else f'NO ({failures})'}")
    print(f"soak time: {time.monotonic() - began:.0f} s ({len(rows)} kills in {len(plans)} "
          f"chains, {args.ranks} ranks)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
