"""Progress lines: done/total, percent, rate and time left, at most every N seconds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from imagegen_pipeline import progress as progress_module
from imagegen_pipeline.progress import Progress


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def test_lines_every_n_seconds(clock: Clock) -> None:
    lines: list[str] = []
    progress = Progress("images", 10, lines.append, every_seconds=10)

    clock.now += 5
    progress.advance()
    assert lines == []  # not due yet
    clock.now += 5
    progress.advance()
    assert lines == ["images: 2/10 (20 %), 0.20/s, ETA 40 s"]
    clock.now += 9
    progress.advance()
    assert len(lines) == 1  # 9 s since the last line
    clock.now += 1
    progress.advance()
    assert lines[-1] == "images: 4/10 (40 %), 0.20/s, ETA 30 s"
    clock.now += 30
    progress.advance(6)
    assert len(lines) == 2  # done: the final line is finish()'s
    progress.finish()
    assert lines[-1] == "images: 10/10 (100 %), 0.20/s"


def test_eta_in_minutes_and_hours(clock: Clock) -> None:
    progress = Progress("clips", 1000, lambda line: None)
    clock.now += 65
    progress.advance(100)  # 100 in 65 s: 900 more take 585 s
    assert progress.line() == "clips: 100/1000 (10 %), 1.54/s, ETA 9 min 45 s"
    clock.now += 3600 - 65
    assert progress.line() == "clips: 100/1000 (10 %), 0.03/s, ETA 9 h 00 min"


def test_nothing_done_yet_has_no_eta(clock: Clock) -> None:
    progress = Progress("quality", 5, lambda line: None)
    clock.now += 3
    assert progress.line() == "quality: 0/5 (0 %), 0.00/s"


def test_nothing_to_do_logs_nothing(clock: Clock) -> None:
    lines: list[str] = []
    progress = Progress("images", 0, lines.append, every_seconds=0)
    progress.finish()
    assert lines == []
    assert progress.line() == "images: 0/0, 0.00/s"


def test_every_seconds_zero_logs_each_advance(clock: Clock) -> None:
    lines: list[str] = []
    progress = Progress("images", 3, lines.append, every_seconds=0)
    for _ in range(3):
        clock.now += 2
        progress.advance()
    assert lines == [
        "images: 1/3 (33 %), 0.50/s, ETA 4 s",
        "images: 2/3 (67 %), 0.50/s, ETA 2 s",
    ]
