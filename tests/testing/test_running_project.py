"""The running-project harness (tests/support/running_project.py) reports its own failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.running_project import ProjectTimeout, RunningProject


def test_a_webserver_that_never_answers_shows_the_make_ui_log(tmp_path: Path) -> None:
    # `make ui` died before writing its DAGSTER_HOME: the timeout must still show its log,
    # not an error about the missing instance.
    log = tmp_path / "make-ui.log"
    log.write_text("dagster dev starting\nmake: *** [Makefile:22: ui] Error 1\n")
    project = RunningProject(
        port=1,
        home=tmp_path / "never-written",
        prompts=tmp_path / "prompts",
        storage=tmp_path / "storage",
        log=log,
        env={},
    )
    with pytest.raises(ProjectTimeout) as raised:
        project.wait_for("the webserver", lambda: False, timeout=0.2)
    message = str(raised.value)
    assert "timed out waiting for the webserver" in message
    assert "make: *** [Makefile:22: ui] Error 1" in message
    assert "runs: unreadable" in message
