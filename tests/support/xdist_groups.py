"""`make test` runs the suite on pytest-xdist workers (``-n 3 --dist loadgroup``); these hooks
(imported by tests/conftest.py) decide which tests must share a worker.

A test that uses a module- or class-scoped fixture (one graph run, one `make ui`, one celery
stack) runs on the worker that runs the rest of its module, in file order, so the fixture is
built once; tests with the same ``@pytest.mark.xdist_group(name)`` share a worker too; every
other test is independent and goes to whichever worker is free. A new test module needs no
mark of its own. Modules with a ``slow`` test (minutes: `make ui`, celery, the whole graph)
are handed out first, so the longest chains of work start at once rather than last. Session
fixtures (tiny models, the distributed tests' servers) are built once per worker that uses them.

xdist's own ``--dist loadgroup`` passes a test's ``xdist_group`` from the worker to the
scheduler by appending ``@group`` to the test's node id, which pytest 9.2's structured node
ids silently ignore (pytest-dev/pytest-xdist#1386): every test was scheduled alone. The workers
here write the groups to a file the scheduler reads instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

SHARED_SCOPES = {"module", "class"}
_GROUPS_FILE = pytest.StashKey[Path]()
_WORKER_INPUT_KEY = "imagegen_test_groups"


def shared_fixture_group(item: pytest.Item) -> str | None:
    """The group of ``item``: its ``xdist_group`` mark, else its module when it uses a
    module- or class-scoped fixture, else None (it runs anywhere)."""
    mark = item.get_closest_marker("xdist_group")
    if mark is not None:
        return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    fixture_info = getattr(item, "_fixtureinfo", None)
    if fixture_info is None:
        return None
    scopes = {defs[-1].scope for defs in fixture_info.name2fixturedefs.values() if defs}
    return item.nodeid.split("::")[0] if scopes & SHARED_SCOPES else None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with a slow test first (each module kept whole, in file order); on an xdist
    worker, write every grouped test's group for the scheduler."""
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_modules)  # stable: file order within
    worker_input: dict[str, Any] | None = getattr(config, "workerinput", None)
    if not worker_input or _WORKER_INPUT_KEY not in worker_input:
        return
    groups = {item.nodeid: group for item in items if (group := shared_fixture_group(item))}
    target = Path(worker_input[_WORKER_INPUT_KEY])
    # Every worker collects the same tests and writes the same groups; a rename keeps each
    # write whole.
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".groups-")
    with os.fdopen(handle, "w") as file:
        json.dump(groups, file)
    os.replace(temporary, target)


def _groups_file(config: pytest.Config) -> Path:
    """Where the workers write the groups (made on first use, removed at the end)."""
    if _GROUPS_FILE not in config.stash:
        folder = Path(tempfile.mkdtemp(prefix="imagegen-xdist-"))
        config.add_cleanup(lambda: _remove(folder))
        config.stash[_GROUPS_FILE] = folder / "groups.json"
    return config.stash[_GROUPS_FILE]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Tell each worker, as it starts, where to write the groups."""
    if node.config.getvalue("dist") == "loadgroup":
        node.workerinput[_WORKER_INPUT_KEY] = str(_groups_file(node.config))


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` with the groups the workers wrote, handed out in collection order
    (slow modules first) rather than by the number of tests in a group."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    config.option.loadscopereorder = False

    groups_file = _groups_file(config)

    class SharedFixtureScheduling(LoadGroupScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # the workers have all collected when scheduling starts
                written = groups_file.exists()
                self.groups = json.loads(groups_file.read_text()) if written else {}
            group = self.groups.get(nodeid)
            return f"group:{group}" if group else super()._split_scope(nodeid)

    return SharedFixtureScheduling(config, log)


def _remove(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
