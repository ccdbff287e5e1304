"""`make test`'s worker groups (tests/support/xdist_groups.py), on a small suite of its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

pytest.importorskip("xdist")

SUITE = """
import os

import pytest

BUILT = []


@pytest.fixture(scope="module")
def shared():
    BUILT.append(os.environ["PYTEST_XDIST_WORKER"])
    return BUILT


def test_first(shared):
    assert shared == [os.environ["PYTEST_XDIST_WORKER"]]


def test_second(shared):
    assert len(shared) == 1


def test_third(shared):
    assert len(shared) == 1


@pytest.mark.xdist_group("pair")
def test_marked_a():
    pass


@pytest.mark.xdist_group("pair")
def test_marked_b():
    pass
"""
CONFTEST = """
from tests.support.xdist_groups import (  # noqa: F401
    pytest_collection_modifyitems,
    pytest_configure_node,
    pytest_xdist_make_scheduler,
)
"""


def test_tests_sharing_a_module_fixture_or_a_group_mark_share_a_worker(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_suite.py").write_text(SUITE)
    for index in range(6):  # independent tests, to keep both workers busy
        (tmp_path / f"test_free_{index}.py").write_text("def test_free():\n    pass\n")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v"),
            *("-p", "no:cacheprovider", f"--rootdir={tmp_path}", str(tmp_path)),
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    worker_of = {
        test: worker for worker, test in re.findall(r"\[(gw\d)\].*PASSED (\S+)", result.stdout)
    }
    assert len(worker_of) == 11, result.stdout
    names = re.findall(r"def (test_\w+)", SUITE)
    suite = {name: worker_of[f"test_suite.py::{name}"] for name in names}
    assert suite["test_first"] == suite["test_second"] == suite["test_third"]
    assert suite["test_marked_a"] == suite["test_marked_b"]
