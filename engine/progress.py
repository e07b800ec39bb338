"""Rank-0 progress lines with rate and ETA for long stages."""
from __future__ import annotations

import time

from engine.context import RankContext


class Progress:
    """Report `done / total` items with a rate and an ETA, at most every `every_s` seconds.

    Rank 0 reports its own shard scaled by the rank count (shards are balanced), so reporting
    needs no communication.
    """

    def __init__(self, ctx: RankContext, what: str, total_local: int, unit: str = "frames",
                 every_s: float = 10.0, extra=None):
        self.ctx, self.what, self.total, self.unit = ctx, what, max(total_local, 0), unit
        self.every_s, self.extra = every_s, extra
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, n_new: int = 1, force: bool = False) -> None:
        """Count `n_new` more items done on this rank; print when due."""
        self.done += n_new
        now = time.monotonic()
        if not self.ctx.is_root or (now - self.last < self.every_s and not force):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        extra = f", {self.extra(rate)}" if self.extra else ""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        self.ctx.log(f"{self.what}: {self.done}/{self.total} {self.unit} on rank 0 ({pct:.0f}%), "
                     f"{rate * self.ctx.size:.1f} {self.unit}/s all ranks{extra}, "
                     f"ETA {_clock(left)}")

    def finish(self) -> None:
        """Print the final line."""
        self.update(0, force=True)


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
