"""The user flows run against the project as a user starts it: one `make ui` (webserver, daemon,
sensors, schedule) per test module, shared by its tests, which run in order as the stages of one
day of use. Two modules, two projects: their stages wait on the daemon, so the modules run side
by side on two test workers rather than one after the other.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.running_project import RunningProject, running_project

LOCAL = ("flux_schnell", "sdxl_turbo")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProject]:
    """`make ui` as a user starts it, on temporary folders, with the models on "auto"."""
    with running_project(
        tmp_path_factory.mktemp("project"),
        # Each sensor tick costs the daemon and the code server CPU the runs need; at 5 s a
        # stage waits a second or two longer than at 3 s, for a third less of that overhead.
        IMAGEGEN_SENSOR_INTERVAL_SECONDS="5",
        IMAGEGEN_BULK_CRON="* * * * *",
        IMAGEGEN_REVIEW_PAUSE_SECONDS="10",
    ) as running:
        yield running
