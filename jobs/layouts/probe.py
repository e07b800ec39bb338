"""The ``/probe`` group: the cores of every rank (``cores``) and the hosts (attribute)."""
from __future__ import annotations

import numpy as np

from engine.store import RunStore

GROUP = "/probe"
"""The store group of the probe stage."""


def create_cores(store: RunStore, ranks: int) -> None:
    """Create the per-rank ``cores`` dataset (collective)."""
    store.create_dataset(f"{GROUP}/cores", (ranks,), dtype="i4", unit="cores")


def put_cores(store: RunStore, rank: int, cores: int) -> None:
    """Write this rank's core count (independent)."""
    store.write_rows(f"{GROUP}/cores", rank, [cores])


def put_hosts(store: RunStore, hosts: list[str]) -> None:
    """Record every rank's host name (collective)."""
    store.set_attrs(GROUP, hosts=hosts)


def read_cores(store: RunStore) -> np.ndarray:
    """The core count of every rank."""
    return store.read(f"{GROUP}/cores")
