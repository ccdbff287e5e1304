"""Claims in the storage itself, raced by real OS processes on a local folder and on S3 (moto).

- N processes that try one claim at the same instant: exactly one gets it, every other one is
  told who holds it;
- a live holder keeps its claim past several lease lengths (its thread renews it);
- a holder on another machine (as its claim says) SIGKILLed while holding: nobody gets the claim
  before its lease ends, somebody gets it after; a holder on this machine SIGKILLed: its claim
  is taken over at once; N processes racing for a dead holder's claim: exactly one takes it
  over;
- a step that raises releases its claim.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagegen_pipeline import claims as claims_module
from imagegen_pipeline.claims import ClaimBusy, Claims
from imagegen_pipeline.storage import Storage
from tests.services import S3Service, ServiceUnavailable, start_s3

LEASE = 2.0  # seconds: short, so the expiry tests are quick
RACERS = 4
SPAWN = multiprocessing.get_context("spawn")  # children build their own s3fs event loop


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    try:
        service = start_s3(tmp_path_factory.mktemp("claims-s3"))
    except ServiceUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """How a child process builds the storage: ``Storage(base, **options)``."""
    if request.param == "local":
        return {"base": str(tmp_path / "storage"), "options": {}}
    s3: S3Service = request.getfixturevalue("s3")
    return {"base": f"s3://{s3.bucket}/{uuid.uuid4().hex[:8]}", "options": s3.storage_options}


def claims_of(where: dict[str, Any], lease: float = LEASE) -> Claims:
    return Claims(Storage(where["base"], **where["options"]), lease_seconds=lease, poll_seconds=0.1)


def _race(
    where: dict[str, Any], name: str, not_before: float, start: Any, done: Any, out: Any
) -> None:
    claims = claims_of(where, lease=30)
    claims.read(name)  # connect before the start line: the race is on the create, not the setup
    start.wait(timeout=120)  # every racer is ready (spawned interpreters import for seconds)
    time.sleep(max(0.0, not_before - time.time()))
    claim, holder = claims.try_acquire(name, log=lambda _: None)
    out.put((os.getpid(), claim is not None, None if holder is None else holder.holder))
    done.wait(timeout=120)  # hold until every racer has tried, however slow the machine
    if claim is not None:
        claim.release()


def race(
    where: dict[str, Any], name: str, not_before: float = 0.0
) -> list[tuple[int, bool, str | None]]:
    """RACERS processes try ``name`` at one instant (not before ``not_before``); each reports
    (pid, won, holder it saw)."""
    out, start, done = SPAWN.Queue(), SPAWN.Barrier(RACERS), SPAWN.Event()
    processes = [
        SPAWN.Process(target=_race, args=(where, name, not_before, start, done, out))
        for _ in range(RACERS)
    ]
    for process in processes:
        process.start()
    try:
        results = [out.get(timeout=180) for _ in processes]
    finally:
        done.set()
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    return results


def _hold_forever(where: dict[str, Any], name: str, ready: Any, machine: str, lease: float) -> None:
    if machine != "this":
        claims_module.MACHINE = machine  # as if it ran on another machine: leases only
    claim, _ = claims_of(where, lease).try_acquire(name, log=lambda _: None)
    assert claim is not None
    ready.put(claim.holder)
    time.sleep(3600)


def test_of_processes_racing_for_one_claim_exactly_one_wins(where: dict[str, Any]) -> None:
    for round_ in range(2):
        results = race(where, f"images/race{round_}/flux_schnell")
        winners = [pid for pid, won, _ in results if won]
        assert len(winners) == 1, results
        (winner,) = winners
        # every loser saw the winner as the holder
        assert {holder.split(":")[1] for _, won, holder in results if not won} == {str(winner)}
    # released at the end: the next run gets it at once
    claims = claims_of(where)
    assert claims.read("images/race0/flux_schnell") is None
    with claims.hold("images/race0/flux_schnell", wait=False) as claim:
        assert claim is not None


def start_holder(where: dict[str, Any], name: str, machine: str, lease: float) -> Any:
    """A process that takes ``name`` and holds it until killed; returns (process, holder id)."""
    ready = SPAWN.Queue()
    holder = SPAWN.Process(target=_hold_forever, args=(where, name, ready, machine, lease))
    holder.start()
    return holder, ready


def test_a_live_holder_keeps_its_claim_and_a_killed_one_loses_it_when_its_lease_ends(
    where: dict[str, Any],
) -> None:
    name = "clips/kill/flux_schnell"
    holder, ready = start_holder(where, name, "another-machine", LEASE)
    try:
        holder_id = ready.get(timeout=60)
        claims = claims_of(where)
        first = claims.read(name)
        assert first is not None and first.holder == holder_id
        # three lease lengths later the holder still has it, with a lease renewed meanwhile
        time.sleep(3 * LEASE)
        renewed = claims.read(name)
        assert renewed is not None and renewed.holder == holder_id
        assert renewed.expires_at > first.expires_at + LEASE
        with pytest.raises(ClaimBusy, match=holder_id), claims.hold(name, wait=False):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=30)
    killed_at = time.time()
    last = claims.read(name)
    assert last is not None and last.holder == holder_id and not last.expired()

    waits: list[str] = []
    with claims.hold(name, on_wait=waits.append) as claim:
        taken_at = time.time()
        assert claim is not None and claim.holder != holder_id
    assert taken_at >= last.expires_at  # not before the dead holder's lease ended
    assert taken_at - killed_at <= LEASE + 2  # and soon after
    assert any(holder_id in line for line in waits), waits


def test_a_holder_killed_on_this_machine_is_taken_over_without_waiting_for_its_lease(
    where: dict[str, Any],
) -> None:
    name = "images/local-kill/flux_schnell"
    holder, ready = start_holder(where, name, "this", lease=60)
    try:
        holder_id = ready.get(timeout=60)
        claims = claims_of(where)
        with pytest.raises(ClaimBusy, match=holder_id), claims.hold(name, wait=False):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=30)
    last = claims.read(name)
    assert last is not None and last.holder == holder_id and not last.expired()
    with claims.hold(name, wait=False) as claim:
        assert claim is not None and claim.holder != holder_id
        assert time.time() < last.expires_at  # did not wait for the lease


@pytest.mark.parametrize("machine", ["this", "another-machine"])
def test_processes_racing_to_take_over_a_dead_holders_claim_exactly_one_wins(
    where: dict[str, Any], machine: str
) -> None:
    name = f"images/stale-{machine}/sdxl_turbo"
    # from this machine: the racers see its process is gone; from another: its lease ends
    holder, ready = start_holder(where, name, machine, 60 if machine == "this" else LEASE)
    try:
        dead = ready.get(timeout=60)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=30)
    # the racers start after the dead holder's lease has ended
    results = race(where, name, not_before=time.time() + LEASE + 0.5)
    winners = [pid for pid, won, _ in results if won]
    assert len(winners) == 1, results
    assert all(seen != dead for _, won, seen in results if not won), results


def test_a_step_that_fails_releases_its_claim(where: dict[str, Any]) -> None:
    claims = claims_of(where)
    name = "images/boom/flux_schnell"
    with pytest.raises(ValueError, match="model broke"), claims.hold(name) as claim:
        held = claims.read(name)
        assert claim is not None and held is not None and held.holder == claim.holder
        raise ValueError("model broke")
    assert claims.read(name) is None
