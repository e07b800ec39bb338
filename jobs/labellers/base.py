"""The labeller interface every backend fills: the :class:`Labeller` protocol, the
:class:`LabelError` of a failed attempt (with its reason code), and the ASE-style split of a
stateless template from a launch profile (:class:`TemplateLabeller`, :class:`LaunchProfile`)."""
from __future__ import annotations
from ase import Atoms
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Protocol
from typing import runtime_checkable
import os
import shutil


REASONS = ("exit", "timeout", "launch", "no_outcar", "truncated", "unconverged", "bad_outcar",
           "atom_count", "wrong_frame", "no_result", "bad_result")
"""Reason codes of failed attempts (`exit` carries the exit status: ``exit_1``)."""


class LabelError(Exception):
    """A failed labelling attempt: `reason` is a short code of REASONS, `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class LaunchProfile:
    """How an external DFT program is launched: the command (argument list), its time limit
    and environment; `section` names the manifest section in messages, `log_name` the file in
    the work directory that takes its output. One per backend (VaspProfile, GpawProfile)."""

    command: tuple[str, ...]
    walltime_s: float
    kill_grace_s: float = 10.0
    env: Mapping[str, str] = field(default_factory=dict)
    section: str = "label"
    log_name: str = "program.out"

    def check(self) -> None:
        """Raise InputError when the command's program cannot be found."""
        from engine.failure import InputError

        program = self.command[0]
        if shutil.which(program) is None and not (Path(program).is_file()
                                                   and os.access(program, os.X_OK)):
            raise InputError(f"{self.section}.command: program {program!r} not found on PATH "
                             "(nor an executable file)")

    def run(self, work_dir: Path) -> int:
        """Run the command in `work_dir`; returns its exit status.

        Raises
        ------
        LabelError
            ``timeout`` past `walltime_s` (the process group is killed), ``launch`` when the
            program cannot be started.
        """
        from engine.external import ProgramTimeout, run_program

        try:
            return run_program(self.command, work_dir, work_dir / self.log_name, self.env,
                               self.walltime_s, self.kill_grace_s)
        except OSError as exc:
            raise LabelError("launch", f"{self.command[0]}: {exc.strerror}") from None
        except ProgramTimeout:
            raise LabelError("timeout", f"killed after {self.walltime_s:g} s") from None


def tail(path: Path, n_chars: int = 200) -> str:
    """The last characters of a log file, on one line."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " ".join(text[-n_chars:].split())


class TemplateLabeller:
    """A labeller that writes a template's input, runs a program under a :class:`LaunchProfile`
    and reads the template's result (VASP, GPAW). A subclass names itself (`name`) and the file
    whose presence marks a finished run (`result_file`); `check` is its own."""

    name = "program"
    result_file = "result"

    def __init__(self, template, profile: LaunchProfile):
        self.template = template
        self.profile = profile

    def label(self, atoms: Atoms, work_dir: Path, title: str) -> Atoms:
        """Write the input, run the program, read and check the result (LabelError on
        failure)."""
        work_dir = Path(work_dir)
        self.template.write_input(work_dir, atoms, title)
        status = self.profile.run(work_dir)
        if status != 0:
            raise LabelError(f"exit_{status}" if status > 0 else f"exit_signal{-status}",
                             tail(work_dir / self.profile.log_name))
        return self.template.read_results(work_dir, atoms)

    def recover(self, atoms: Atoms, work_dir: Path) -> Atoms | None:
        """The result already in `work_dir` if it is complete and of `atoms`, else None."""
        if not (Path(work_dir) / self.result_file).is_file():
            return None
        try:
            return self.template.read_results(work_dir, atoms)
        except LabelError:
            return None


@runtime_checkable
class Labeller(Protocol):
    """What the label stage needs of a backend."""

    name: str
    """Short name (the manifest's `label.labeller`)."""

    def check(self, species: list[str]) -> None:
        """Raise engine.failure.InputError if frames of `species` cannot be labelled (a missing
        POTCAR, ...); called on every rank before any job is launched."""

    def label(self, atoms: Atoms, work_dir: Path, title: str) -> Atoms:
        """Label `atoms` in `work_dir` (created if missing); raise LabelError on failure."""

    def recover(self, atoms: Atoms, work_dir: Path) -> Atoms | None:
        """The labelled frame if `work_dir` already holds a complete, valid result for `atoms`
        (a job that finished after its rank was killed); None otherwise."""
