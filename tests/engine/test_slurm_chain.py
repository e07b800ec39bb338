"""run/slurm.sbatch as a chain: stub `srun`, `sbatch` and `dynshift` on PATH stand in for
Slurm; the script resubmits itself on dynshift's "resume me" status (75) and stops on 0, on
the failure statuses and at the cap on links; Slurm's warning signal reaches dynshift."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "run" / "slurm.sbatch"


def _stubs(tmp_path: Path, srun_body: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    stubs = {
        "srun": srun_body,
        "sbatch": f'echo "sbatch link=$DYNSHIFT_LINK $*" >> {log}\n',
        "dynshift": f'echo "dynshift $*" >> {log}\n',
    }
    for name, body in stubs.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DYNSHIFT_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="1234", SCRATCH=str(tmp_path))
    return env


def _chain(tmp_path, status: int, link: int = 1, max_links: int = 20):
    env = _stubs(tmp_path, f"exit {status}\n")
    env.update(DYNSHIFT_LINK=str(link), DYNSHIFT_MAX_LINKS=str(max_links))
    proc = subprocess.run(["bash", str(SCRIPT), "m.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls.log").read_text() if (tmp_path / "calls.log").exists() else ""
    return proc, calls


def test_resume_status_submits_the_next_link(tmp_path):
    proc, calls = _chain(tmp_path, 75, link=3)
    assert proc.returncode == 75, proc.stderr
    assert "sbatch link=4 --export=ALL --dependency=afterany:1234" in calls
    assert calls.rstrip().endswith("m.yaml") and "dynshift report" not in calls
    assert "chain link 3 of at most 20" in proc.stdout


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_other_statuses_end_the_chain(tmp_path, status):
    proc, calls = _chain(tmp_path, status)
    assert proc.returncode == status
    assert "sbatch" not in calls
    assert ("dynshift report" in calls) == (status == 0)


def test_the_cap_on_links_ends_the_chain(tmp_path):
    proc, calls = _chain(tmp_path, 75, link=5, max_links=5)
    assert proc.returncode == 75 and "sbatch" not in calls
    assert "5 links reached" in proc.stdout


def test_slurms_warning_signal_reaches_dynshift_and_the_chain_goes_on(tmp_path):
    """Slurm signals the batch shell (--signal=B:USR1@300); the shell passes it to srun, and
    the stub 'dynshift' under it stops with 75, as dynshift run does at a safe point."""
    ready = tmp_path / "ready"
    env = _stubs(tmp_path, f"trap 'exit 75' USR1\ntouch {ready}\n"
                           "for i in $(seq 600); do sleep 0.1; done\nexit 0\n")
    proc = subprocess.Popen(["bash", str(SCRIPT), "m.yaml"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists()
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, out + err
    assert "asking dynshift to stop" in out
    assert "sbatch link=2" in (tmp_path / "calls.log").read_text()
