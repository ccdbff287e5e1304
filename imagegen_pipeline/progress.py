"""Progress lines for long steps: done / total, items per second and time left."""

from __future__ import annotations

import time
from collections.abc import Callable

PROGRESS_SECONDS = 10.0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


class Progress:
    """Logs "what: done/total (pct), rate/s, ETA" every ``every_seconds`` and at the end."""

    def __init__(
        self,
        what: str,
        total: int,
        log: Callable[[str], None],
        every_seconds: float = PROGRESS_SECONDS,
    ) -> None:
        self.what = what
        self.total = total
        self.log = log
        self.every_seconds = every_seconds
        self.done = 0
        self._started = time.monotonic()
        self._last_line = self._started

    def line(self) -> str:
        """The current progress as one line."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = self.done / elapsed
        share = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        left = self.total - self.done
        eta = f", ETA {_duration(left / rate)}" if rate > 0 and left > 0 else ""
        return f"{self.what}: {self.done}/{self.total}{share}, {rate:.2f}/s{eta}"

    def advance(self, count: int = 1) -> None:
        """Count ``count`` more items done; log a line when one is due."""
        self.done += count
        now = time.monotonic()
        if now - self._last_line >= self.every_seconds and self.done < self.total:
            self._last_line = now
            self.log(self.line())

    def finish(self) -> None:
        """Log the final line (when there was anything to do)."""
        if self.total:
            self.log(self.line())
