"""Readers of labelled DFT frames: extended XYZ with `fermi_contact_mhz`, or VASP OUTCARs.

Every frame comes back as an :class:`ase.Atoms` with

- ``atoms.arrays["fermi_contact_mhz"]``: the isotropic Fermi-contact coupling A_tot (MHz) of
  every ion (for an OUTCAR: the last column of the LAST table "Fermi contact (isotropic)
  hyperfine coupling parameter (MHz)");
- energy (eV) and forces (eV/A) in a :class:`~ase.calculators.singlepoint.SinglePointCalculator`
  (the energy is VASP's free energy TOTEN, as in the shared extended XYZ files);
- ``atoms.info["source"]``: where the frame came from (an OUTCAR path, or the ``source`` key
  of the extended XYZ comment line when it has one, else ``<file>@<index>``);
- for OUTCARs, ``atoms.info["magnetic_moment_s"]``: the last "Total magnetic moment S=" value.

Positions, cell, energy and forces of an OUTCAR are those of its LAST ionic step, read by ASE's
``vasp-out`` reader; the hyperfine table is parsed here (ASE does not read it).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from engine.failure import InputError
from jobs.frame_checks import MIN_DISTANCE_A, check_frames

FERMI_CONTACT_KEY = "fermi_contact_mhz"
"""Per-atom array name of the isotropic Fermi-contact coupling A_tot (MHz)."""

_HYPERFINE_TITLE = "Fermi contact (isotropic) hyperfine coupling parameter (MHz)"
_MOMENT_RE = re.compile(r"Total magnetic moment S=\s*([-+0-9.Ee]+)")
_EXTXYZ_SUFFIXES = (".xyz", ".extxyz")


def is_outcar(path: Path) -> bool:
    """True when `path` names a VASP OUTCAR (a file whose name starts with ``OUTCAR``)."""
    return Path(path).name.startswith("OUTCAR")


def _parse_hyperfine(lines: list[str], path: Path) -> np.ndarray:
    """A_tot (MHz) of every ion from the LAST Fermi-contact table of an OUTCAR's lines."""
    starts = [i for i, line in enumerate(lines) if _HYPERFINE_TITLE in line]
    if not starts:
        raise InputError(f"{path}: no '{_HYPERFINE_TITLE}' table (was LHYPERFINE set, "
                         "and did the run finish?)")
    first = starts[-1]
    # title, dashes, header, dashes, then one row per ion, closed by a dashed line
    values: list[float] = []
    ions: list[int] = []
    closed = False
    for number, line in enumerate(lines[first + 4:], start=first + 5):
        text = line.strip()
        if text.startswith("---"):
            closed = True
            break
        fields = text.split()
        try:
            ions.append(int(fields[0]))
            values.append(float(fields[-1]))
        except (ValueError, IndexError):
            raise InputError(f"{path}: line {number}: cannot read a row of the Fermi-contact "
                             f"table: {text!r}") from None
    if not closed or not values:
        raise InputError(f"{path}: the last Fermi-contact table is truncated "
                         f"(table at line {first + 1})")
    if ions != list(range(1, len(ions) + 1)):
        raise InputError(f"{path}: the Fermi-contact table (line {first + 1}) does not list "
                         "ions 1..N in order")
    return np.asarray(values, dtype=float)


def read_outcar(path: str | Path, min_distance_a: float | None = None) -> Atoms:
    """Read the last ionic step of a VASP OUTCAR with its Fermi-contact couplings.

    Parameters
    ----------
    path
        The OUTCAR file (a run with ``LHYPERFINE = .TRUE.``).
    min_distance_a
        When given, the structure is checked (:func:`jobs.frame_checks.check_frames`: finite
        positions and cell, no two atoms closer than this, A); None: not checked (the VASP
        labeller reads back the frames it wrote).

    Returns
    -------
    ase.Atoms
        Positions (A) and cell of the last ionic step; energy (eV, free energy TOTEN) and
        forces (eV/A) in a SinglePointCalculator; ``arrays["fermi_contact_mhz"]`` (A_tot of
        the last hyperfine table); ``info["source"]`` and ``info["magnetic_moment_s"]``.

    Raises
    ------
    InputError
        When the file is missing, truncated, has no hyperfine table, or its table does not
        have one row per atom; when checked, for a non-finite or too close structure.
    """
    import ase.io

    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise InputError(f"{path}: cannot read the OUTCAR: {exc.strerror}") from None
    lines = text.splitlines()
    a_tot_mhz = _parse_hyperfine(lines, path)
    try:
        frame = ase.io.read(path, format="vasp-out", index=-1)
    except Exception as exc:  # noqa: BLE001 - any parser failure is bad input, named
        raise InputError(f"{path}: ASE cannot read the OUTCAR ({type(exc).__name__}: "
                         f"{exc}); is it truncated?") from None
    if len(frame) != len(a_tot_mhz):
        raise InputError(f"{path}: the Fermi-contact table has {len(a_tot_mhz)} rows but the "
                         f"structure has {len(frame)} atoms")
    results = frame.calc.results if frame.calc is not None else {}
    if "forces" not in results or ("free_energy" not in results and "energy" not in results):
        raise InputError(f"{path}: no energy/forces of the last ionic step (truncated?)")
    energy_ev = float(results.get("free_energy", results.get("energy")))
    if min_distance_a is not None:
        check_frames(frame.positions, frame.cell.array, frame.numbers, str(path), 0,
                     min_distance_a)
    forces = np.array(results["forces"], dtype=float)
    atoms = Atoms(frame.get_chemical_symbols(), positions=frame.positions, cell=frame.cell,
                  pbc=True)
    atoms.arrays[FERMI_CONTACT_KEY] = a_tot_mhz
    atoms.calc = SinglePointCalculator(atoms, energy=energy_ev, forces=forces)
    atoms.info["source"] = str(path)
    atoms.info["file"], atoms.info["file_index"] = str(path), 0
    moments = _MOMENT_RE.findall(text)
    if moments:
        atoms.info["magnetic_moment_s"] = float(moments[-1])
    return atoms


def _read_extxyz(path: Path, min_distance_a: float = MIN_DISTANCE_A) -> list[Atoms]:
    import ase.io

    try:
        fmt = "extxyz" if path.suffix.lower() in _EXTXYZ_SUFFIXES else None
        frames = ase.io.read(path, ":", format=fmt)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: cannot read labelled frames ({type(exc).__name__}: "
                         f"{exc})") from None
    for index, atoms in enumerate(frames):
        if FERMI_CONTACT_KEY not in atoms.arrays:
            raise InputError(f"{path}: frame {index} has no per-atom '{FERMI_CONTACT_KEY}' "
                             "column (Properties=...:fermi_contact_mhz:R:1)")
        values = np.asarray(atoms.arrays[FERMI_CONTACT_KEY], dtype=float)
        if not np.all(np.isfinite(values)):
            raise InputError(f"{path}: frame {index}: '{FERMI_CONTACT_KEY}' is not finite")
        atoms.arrays[FERMI_CONTACT_KEY] = values.reshape(len(atoms))
        results = atoms.calc.results if atoms.calc is not None else {}
        for key in ("energy", "forces"):
            if key in results and not np.all(np.isfinite(results[key])):
                raise InputError(f"{path}: frame {index}: non-finite {key}")
        check_frames(atoms.positions, atoms.cell.array, atoms.numbers, str(path), index,
                     min_distance_a)
        atoms.info.setdefault("source", f"{path}@{index}")
        atoms.info["file"], atoms.info["file_index"] = str(path), index
    return frames


def read_labelled_frames(path: str | Path, min_distance_a: float = MIN_DISTANCE_A
                         ) -> list[Atoms]:
    """Read labelled frames from an extended XYZ file, an OUTCAR, or a folder of OUTCARs.

    Parameters
    ----------
    path
        An extended XYZ file (every frame with a per-atom ``fermi_contact_mhz`` column), a VASP
        OUTCAR (a file named ``OUTCAR*``), or a directory whose files named ``OUTCAR*`` are
        read in sorted order.
    min_distance_a
        Two atoms of a frame closer than this (A, minimum image; ``checks.min_distance_a``)
        are refused, as are non-finite positions or cells.

    Returns
    -------
    list of ase.Atoms
        One per frame, in file order, each with ``arrays["fermi_contact_mhz"]``, energy and
        forces, and ``info["source"]`` (see the module docstring).

    Raises
    ------
    InputError
        For a missing path, an empty folder, a frame without couplings, or a frame with a
        non-finite position, cell, energy, force or coupling, or two atoms too close (the file
        and frame named).
    """
    path = Path(path)
    if path.is_dir():
        outcars = sorted(p for p in path.iterdir() if p.is_file() and is_outcar(p))
        if not outcars:
            raise InputError(f"{path}: a folder without files named OUTCAR*")
        return [read_outcar(p, min_distance_a) for p in outcars]
    if not path.exists():
        raise InputError(f"{path}: no such file or folder of labelled frames")
    if is_outcar(path):
        return [read_outcar(path, min_distance_a)]
    return _read_extxyz(path, min_distance_a)


def read_many(paths, min_distance_a: float = MIN_DISTANCE_A) -> list[Atoms]:
    """Frames of several paths (see :func:`read_labelled_frames`), concatenated in order."""
    frames: list[Atoms] = []
    for path in paths:
        frames.extend(read_labelled_frames(path, min_distance_a))
    return frames
