"""When calls leave: a token bucket for the requests-per-minute quota, and retry backoff.

Every HTTP call, retries included, takes a token first, so the server sees evenly spaced calls
at the configured rate instead of bursts it would answer with 429. Retries wait a full-jitter
exponential backoff (a random delay up to a doubling ceiling), which spreads retries that failed
together, and never less than the delay the server asked for.
"""

from __future__ import annotations

import asyncio
import random
import time

# The bucket refills slightly below the configured rate: a server counting requests in a
# sliding minute could otherwise see rpm + 1 when network jitter bunches two arrivals together.
RATE_HEADROOM = 0.98


class TokenBucket:
    """Async token bucket: ``rate`` tokens per second, at most ``capacity`` saved up.

    Waiters are served in arrival order (asyncio.Lock is FIFO), so no request starves and the
    calls leave evenly spaced instead of in bursts followed by sleeps.
    """

    def __init__(self, rate_per_second: float, capacity: float = 1.0) -> None:
        self.rate = rate_per_second
        self.capacity = capacity
        self._tokens = capacity
        self._updated = time.monotonic()
        self._lock = asyncio.Lock()

    @classmethod
    def per_minute(cls, requests_per_minute: float) -> TokenBucket:
        """A bucket for a requests-per-minute quota, with a little headroom below it."""
        return cls(requests_per_minute * RATE_HEADROOM / 60.0)

    async def acquire(self) -> None:
        """Wait for one token and take it."""
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self._tokens) / self.rate)


def backoff_seconds(
    retry: int,
    initial: float,
    maximum: float,
    server_delay: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """The wait before retry number ``retry`` (1, 2, ...): full-jitter exponential backoff,
    never shorter than ``server_delay`` (the delay the server asked for, if any)."""
    ceiling = min(maximum, initial * 2 ** (retry - 1))
    delay = (rng or random).uniform(0.0, ceiling)
    return max(delay, server_delay) if server_delay is not None else delay
