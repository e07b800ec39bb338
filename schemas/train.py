"""The train stage: SOAP descriptors + the NN-NMR shift model, k-fold, Horovod data-parallel."""
from __future__ import annotations

from schemas.base import InputPath, Spec


class TrainSpec(Spec):
    """Learn the shift of each target nucleus from its SOAP environment."""

    frames: list[InputPath] = []
    """Labelled frames (extended XYZ with `fermi_contact_mhz`, or VASP OUTCARs); the label
    stage's frames in the store are added when that stage ran."""
