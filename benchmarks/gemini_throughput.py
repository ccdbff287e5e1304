"""Throughput of the Gemini backend against a local fake of the API with a server-side quota.

The client is the same GeminiBackend the ``images`` asset uses, talking through the real
google-genai SDK to ``tests.support.fake_servers.FakeGemini`` on 127.0.0.1 (no
network needed).

Scenario 1: 500 ms latency, a quota of 120 requests per sliding minute, 300 prompts, the
client configured at 120 requests/minute. Targets: at least 90% of the quota achieved, no
429, no prompt lost.
Scenario 2: the same, and the server answers 429 to 20% of the calls at random. Target: every
prompt completes (retried), nothing lost.

Each full scenario takes 2.5 to 3.5 minutes at 120 requests/minute; ``--quick`` runs 60
prompts per scenario for a smoke test. Exits 1 when a target is missed.

    .venv/bin/python -m benchmarks.gemini_throughput [--quick] [--prompts N]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.gemini.backend import GeminiBackend
from imagegen_pipeline.backends.gemini.settings import GeminiSettings
from imagegen_pipeline.steps.images import derive_seed
from tests.support.fake_servers import FAKE_GEMINI_KEY, FakeGemini, arrival_stats

QUOTA_RPM = 120
LATENCY_SECONDS = 0.5
MIN_QUOTA_SHARE = 0.90


@dataclass
class Figures:
    """What one scenario measured."""

    name: str
    prompts: int
    wall_seconds: float
    http_requests: int
    requests_per_minute: float
    images_per_minute: float
    busiest_minute: int
    quota_429s: int
    injected_429s: int
    retries: int
    statuses: Counter[str]

    @property
    def lost(self) -> int:
        """Prompts without an image at the end."""
        return self.prompts - self.statuses["ok"]


def make_requests(count: int) -> list[ImageRequest]:
    """``count`` distinct one-image requests."""
    return [
        ImageRequest(
            prompt_id=f"p{i:04d}",
            image_index=0,
            prompt=f"prompt {i}: a lighthouse on a cliff, variation {i}",
            negative_prompt="",
            seed=derive_seed(f"p{i:04d}", 0),
            width=1024,
            height=1024,
        )
        for i in range(count)
    ]


def run_scenario(name: str, prompts: int, random_429_rate: float) -> Figures:
    """Generate ``prompts`` images through the fake server; measure what happened."""
    with FakeGemini(
        api_key=FAKE_GEMINI_KEY,
        latency=LATENCY_SECONDS,
        rpm_quota=QUOTA_RPM,
        quota_window_seconds=60.0,
        random_429_rate=random_429_rate,
        random_seed=20,
        retry_delay_seconds=1.0,
    ) as server:
        settings = GeminiSettings(
            api_key=FAKE_GEMINI_KEY,
            base_url=server.url,
            requests_per_minute=QUOTA_RPM,
            max_concurrent_requests=4,  # 2 calls/s x 0.5 s latency needs 1; room for retries
            max_attempts=9,  # 0.2**9 x 300 prompts: a prompt lost once in ~6000 runs
            timeout_seconds=30.0,
        )
        backend = GeminiBackend(settings)
        started = time.perf_counter()
        statuses: Counter[str] = Counter(
            result.status for result in backend.generate(make_requests(prompts))
        )
        wall = time.perf_counter() - started
        busiest = arrival_stats(server.requests, window_seconds=60.0).max_in_window
        return Figures(
            name=name,
            prompts=prompts,
            wall_seconds=wall,
            http_requests=len(server.requests),
            requests_per_minute=len(server.requests) / wall * 60.0,
            images_per_minute=statuses["ok"] / wall * 60.0,
            busiest_minute=busiest,
            quota_429s=server.quota_rejections,
            injected_429s=server.random_rejections,
            retries=backend.last_run.retries,
            statuses=statuses,
        )


def report(figures: Figures, targets: dict[str, bool]) -> None:
    """Print one scenario's figures and whether each target was met."""
    share = figures.requests_per_minute / QUOTA_RPM
    print(f"\n== {figures.name} ==")
    print(f"prompts                  {figures.prompts}")
    print(f"wall time                {figures.wall_seconds:.1f} s")
    print(f"HTTP requests            {figures.http_requests}")
    print(f"achieved requests/minute {figures.requests_per_minute:.1f} ({share:.1%} of quota)")
    print(f"images/minute            {figures.images_per_minute:.1f}")
    print(f"busiest sliding minute   {figures.busiest_minute} requests (quota {QUOTA_RPM})")
    print(f"429s from the quota      {figures.quota_429s}")
    print(f"429s injected at random  {figures.injected_429s}")
    print(f"retries                  {figures.retries}")
    print(f"statuses                 {dict(figures.statuses)}")
    print(f"prompts lost             {figures.lost}")
    for target, met in targets.items():
        print(f"  [{'PASS' if met else 'FAIL'}] {target}")


def main(argv: list[str] | None = None) -> int:
    """Run both scenarios; 0 when every target is met."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 prompts per scenario")
    parser.add_argument("--prompts", type=int, help="prompts per scenario (default 300)")
    args = parser.parse_args(argv)
    prompts = args.prompts or (60 if args.quick else 300)
    print(
        f"Gemini backend vs fake API: {LATENCY_SECONDS * 1000:.0f} ms latency, quota "
        f"{QUOTA_RPM} requests/minute, client at {QUOTA_RPM} rpm, {prompts} prompts per scenario"
    )

    steady = run_scenario("1: quota only", prompts, random_429_rate=0.0)
    steady_targets = {
        f">= {MIN_QUOTA_SHARE:.0%} of the quota": steady.requests_per_minute
        >= MIN_QUOTA_SHARE * QUOTA_RPM,
        "no 429": steady.quota_429s == 0,
        "no prompt lost": steady.lost == 0,
    }
    report(steady, steady_targets)

    flaky = run_scenario("2: quota and 20% random 429s", prompts, random_429_rate=0.2)
    flaky_targets = {
        "no prompt lost": flaky.lost == 0,
        "no 429 from the quota itself": flaky.quota_429s == 0,
    }
    report(flaky, flaky_targets)
    return 0 if all([*steady_targets.values(), *flaky_targets.values()]) else 1


if __name__ == "__main__":
    sys.exit(main())
