"""First starts on a fresh Dagster home: several at once must leave one usable home.

Dagster's SQLite set-up races: two processes creating a fresh home at the same moment can each
stamp a migration head, and every later command fails. Processes here start in step (a file
barrier after their imports) to make that moment likely.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

# Subprocesses for tens of seconds: handed out first, with the other slow modules.
pytestmark = pytest.mark.slow

HOMES, STARTS_PER_HOME = 2, 3

# Imports first, then wait until every process is ready, then the first start proper.
FIRST_START = """
import sys, time
from pathlib import Path
import dagster
from imagegen_pipeline.cli import main
barrier, total = Path(sys.argv[1]), int(sys.argv[2])
(barrier / sys.argv[3]).touch()
while len(list(barrier.iterdir())) < total:
    time.sleep(0.01)
sys.exit(main(["home"]))
"""

LATER_COMMAND = """
import dagster as dg
with dg.DagsterInstance.get() as instance:
    print("runs:", len(instance.get_runs()))
    print("partitions:", instance.get_dynamic_partitions("prompt_set"))
"""


def environment(home: Path) -> dict[str, str]:
    return {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)}


def test_concurrent_first_starts_leave_a_usable_home(tmp_path: Path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    homes = [tmp_path / f"home{i}" for i in range(HOMES)]
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_START, str(barrier), str(HOMES * STARTS_PER_HOME), name],
            env=environment(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for home in homes
        for name in (f"{home.name}-{n}" for n in range(STARTS_PER_HOME))
    ]
    outputs = [process.communicate(timeout=300)[0] for process in starts]
    for process, output in zip(starts, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    for home in homes:
        assert (home / "dagster.yaml").read_bytes() == (PROJECT_ROOT / "dagster.yaml").read_bytes()
        later = subprocess.run(
            [sys.executable, "-c", LATER_COMMAND],
            env=environment(home),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert later.returncode == 0, later.stderr[-3000:]
        assert "runs: 0" in later.stdout


def test_make_ui_sets_up_the_home_before_dagster_dev(tmp_path: Path):
    plan = subprocess.run(
        ["make", "-n", "-C", str(PROJECT_ROOT), "ui"],
        env={**os.environ, "DAGSTER_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    commands = [line for line in plan if "imagegen home" in line or "dagster dev" in line]
    assert [("imagegen home" in line) for line in commands] == [True, False], plan
