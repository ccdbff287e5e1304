"""The Gemini image backend: many ``generateContent`` calls in flight, paced, retried, budgeted.

``generate`` starts a private event loop in a helper thread and hands its results back to the
caller's thread through a queue, in the order they complete. On the loop, each request is a task:

1. before it is issued, the budget (what is spent plus what the requests in flight are expected
   to cost) and an exhausted daily quota may skip it;
2. each HTTP call waits for a concurrency slot and a token of the rate limiter (pacing.py);
3. a failed call is classified (errors.py): retried after a full-jitter backoff, failed, or, for
   an exhausted daily quota, failed with every request not yet sent;
4. an answer is read (content.py) into an image or a blocked result, and priced (pricing.py).

The results are bounded at both ends: at most a few requests are alive and a few finished images
wait for the caller, so memory stays flat however many prompts there are.
"""

from __future__ import annotations

import asyncio
import io
import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from google import genai
from google.genai import types
from PIL import Image

from imagegen_pipeline.backends.base import ImageBackend, ImageRequest, ImageResult, RunSummary
from imagegen_pipeline.backends.gemini import SPEC
from imagegen_pipeline.backends.gemini.content import (
    image_call_config,
    read_answer,
    request_contents,
)
from imagegen_pipeline.backends.gemini.errors import (
    MISSING_KEY_MESSAGE,
    CallFailure,
    GeminiBackendError,
    GeminiKeyMissingError,
    classify_error,
    clip,
)
from imagegen_pipeline.backends.gemini.pacing import TokenBucket, backoff_seconds
from imagegen_pipeline.backends.gemini.settings import GeminiSettings
from imagegen_pipeline.gemini_client import make_gemini_client, redact
from imagegen_pipeline.model_settings import GenerationSettings, ImageTarget
from imagegen_pipeline.records import utc_now

logger = logging.getLogger(__name__)

BUDGET_WARNING = (
    "Gemini budget of ${budget:.2f} reached (${spent:.4f} spent): {skipped} image(s) were not "
    "requested (status skipped_budget). Raise budget_usd on the gemini resource and re-run to "
    "make them; finished images are kept."
)
DAILY_QUOTA_WARNING = (
    "The Gemini daily quota is exhausted: requests after it were not sent. Re-run after the "
    "quota resets (midnight Pacific time) or use a key with a higher quota."
)


def checked_settings(settings: GeminiSettings) -> GeminiSettings:
    """``settings`` with the key stripped; raises when the key is missing or a value is out of
    range. (The Dagster layer fills ``api_key`` from GEMINI_API_KEY before this runs.)"""
    key = (settings.api_key or "").strip()
    if not key:
        raise GeminiKeyMissingError(MISSING_KEY_MESSAGE)
    positive = ("timeout_seconds", "max_concurrent_requests", "requests_per_minute")
    for name in positive:
        if getattr(settings, name) <= 0:
            raise ValueError(
                f"GeminiSettings.{name} must be positive, got {getattr(settings, name)}"
            )
    if settings.max_attempts < 1:
        raise ValueError(f"GeminiSettings.max_attempts must be >= 1, got {settings.max_attempts}")
    if settings.budget_usd is not None and settings.budget_usd < 0:
        raise ValueError(f"GeminiSettings.budget_usd must be >= 0, got {settings.budget_usd}")
    settings.prices()  # an unknown model without explicit prices is refused before any request
    return settings.model_copy(update={"api_key": key})


@dataclass
class GeminiRunStats:
    """What one ``generate`` call did: the source of ``run_summary`` and the benchmark's figures."""

    http_calls: int = 0
    retries: int = 0
    errors_by_status: Counter[str] = field(default_factory=Counter)  # "429", "503", "timeout"
    max_in_flight: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    spent_usd: float = 0.0
    skipped_budget: int = 0
    budget_reached: bool = False
    daily_quota_exhausted: bool = False


@dataclass
class _Outcome:
    """One request's outcome as the event loop produced it; decoded in the caller's thread."""

    request: ImageRequest
    status: str
    image_bytes: bytes | None = None
    error: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


_DONE = object()  # end of the outcomes of one generate() call


class _RunState:
    """Shared state of one ``generate`` call on the event loop."""

    def __init__(self, settings: GeminiSettings, stats: GeminiRunStats) -> None:
        self.bucket = TokenBucket.per_minute(settings.requests_per_minute)
        self.http_slots = asyncio.Semaphore(settings.max_concurrent_requests)
        self.in_flight = 0
        self.reserved_usd = 0.0  # expected cost of the images issued and not finished yet
        self.daily_quota_error = ""  # set once a daily quota is exhausted: nothing more is sent
        self.stats = stats


class GeminiBackend(ImageBackend):
    """Images from the Gemini API, many requests in flight, paced, retried and budgeted."""

    spec = SPEC

    def __init__(self, settings: GeminiSettings) -> None:
        self.config = checked_settings(settings)  # frozen; its repr leaves the key out
        self.last_run = GeminiRunStats()
        self._random = random.Random()

    def __repr__(self) -> str:
        return f"GeminiBackend(model={self.config.model!r}, base_url={self.config.base_url!r})"

    @property
    def target(self) -> ImageTarget:
        return self.config.image_target(self.name, self.config.model)

    @property
    def settings(self) -> GenerationSettings:
        return self.target.settings

    @property
    def default_size(self) -> tuple[int, int]:
        return self.target.default_size

    @property
    def device(self) -> str:
        return "remote"

    def run_summary(self) -> RunSummary:
        """Totals of the last ``generate`` call, and a warning for a budget or quota hit."""
        stats, budget = self.last_run, self.config.budget_usd
        metadata: dict[str, Any] = {
            "prompt_tokens": stats.prompt_tokens,
            "output_tokens": stats.output_tokens,
            "retries": stats.retries,
            "http_calls": stats.http_calls,
            "spent_usd": stats.spent_usd,
            **({"budget_usd": float(budget)} if budget is not None else {}),  # not a total
            "budget_reached": stats.budget_reached,
            "daily_quota_exhausted": stats.daily_quota_exhausted,
            "errors_by_status": dict(stats.errors_by_status),
        }
        warnings = []
        if stats.budget_reached:
            warnings.append(
                BUDGET_WARNING.format(
                    budget=budget or 0.0, spent=stats.spent_usd, skipped=stats.skipped_budget
                )
            )
        if stats.daily_quota_exhausted:
            warnings.append(DAILY_QUOTA_WARNING)
        return RunSummary(metadata, warnings, totals=frozenset(metadata) - {"budget_usd"})

    # --- the caller's thread ---

    def generate(self, requests: Sequence[ImageRequest]) -> Iterator[ImageResult]:
        """Yield one result per request, in the order they complete.

        The HTTP calls run on a private event loop in a helper thread while the caller handles
        the results (writes PNGs); at most a few finished images wait in between.
        """
        todo = list(requests)
        self.last_run = GeminiRunStats()
        if not todo:
            return
        outbox: queue.Queue[Any] = queue.Queue()
        # Results the caller has not taken yet; the event loop stops producing at this many.
        window = 2 * self.config.max_concurrent_requests
        finished = threading.Event()

        async def start() -> tuple[asyncio.Task[None], asyncio.Semaphore]:
            credits = asyncio.Semaphore(window)
            task = asyncio.create_task(self._produce(todo, outbox, credits))
            task.add_done_callback(lambda _: finished.set())
            return task, credits

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="gemini-backend", daemon=True)
        thread.start()
        task, credits = asyncio.run_coroutine_threadsafe(start(), loop).result()
        delivered: set[tuple[str, int]] = set()
        try:
            while True:
                item = outbox.get()
                if item is _DONE:
                    break
                loop.call_soon_threadsafe(credits.release)
                delivered.add((item.request.prompt_id, item.request.image_index))
                yield self._to_result(item)
            finished.wait()
            error = None if task.cancelled() else task.exception()
            if error is not None:
                message = redact(f"{type(error).__name__}: {error}", self.config.api_key)
                raise GeminiBackendError(f"the Gemini backend failed: {message}") from None
            # A guard, not a path: the loop emits exactly one outcome per request.
            for request in todo:
                if (request.prompt_id, request.image_index) not in delivered:
                    yield ImageResult(request, "failed", error="internal error: no outcome")
        finally:
            if not finished.is_set():  # the caller stopped early: cancel what is in flight
                loop.call_soon_threadsafe(task.cancel)
                finished.wait(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            if not thread.is_alive():
                loop.close()

    def _to_result(self, outcome: _Outcome) -> ImageResult:
        """Decode the image (here, off the event loop) and build the result."""
        image = None
        status, error = outcome.status, outcome.error
        if outcome.image_bytes is not None:
            try:
                image = Image.open(io.BytesIO(outcome.image_bytes))
                image.load()
            except Exception as exc:  # any undecodable payload fails the image
                image, status = None, "failed"
                error = f"the response's image could not be decoded: {type(exc).__name__}: {exc}"
        return ImageResult(
            outcome.request,
            status,  # type: ignore[arg-type]
            image=image,
            error=error,
            seconds=outcome.seconds,
            details=outcome.details,
        )

    # --- the event loop ---

    def _client(self) -> genai.Client:
        return make_gemini_client(
            self.config.api_key or "",
            base_url=self.config.base_url,
            timeout_seconds=self.config.timeout_seconds,
            # SDK retries off: this backend retries itself, so that every retry waits for a
            # token of the rate limiter, honours the server's delay and is counted.
            retry_options=types.HttpRetryOptions(attempts=1),
        )

    async def _produce(
        self, todo: list[ImageRequest], outbox: queue.Queue[Any], credits: asyncio.Semaphore
    ) -> None:
        """Issue the requests in order, at most a bounded number of them alive at once."""
        config = self.config
        state = _RunState(config, self.last_run)
        client = self._client()
        # Requests alive at once (in flight, waiting for a token or backing off): bounds memory.
        alive = asyncio.Semaphore(4 * config.max_concurrent_requests)
        tasks: set[asyncio.Task[None]] = set()

        async def emit(outcome: _Outcome) -> None:
            await credits.acquire()
            outbox.put(outcome)

        async def run_one(request: ImageRequest) -> None:
            try:
                try:
                    outcome = await self._request(client, request, state)
                except Exception as exc:  # one request's bug must not lose others
                    text = redact(f"{type(exc).__name__}: {exc}", config.api_key)
                    outcome = _Outcome(request, "failed", error=clip(f"internal error: {text}"))
                # Held until the caller has room for the result: finished images cannot pile up.
                await emit(outcome)
            finally:
                alive.release()

        try:
            for request in todo:
                await alive.acquire()
                skipped = self._skipped(request, state)
                if skipped is not None:
                    alive.release()
                    await emit(skipped)
                    continue
                state.reserved_usd += config.expected_image_usd()
                task = asyncio.create_task(run_one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await client.aio.aclose()
            outbox.put(_DONE)

    def _skipped(self, request: ImageRequest, state: _RunState) -> _Outcome | None:
        """The outcome of a request that must not be sent (daily quota, budget), else None."""
        config, stats = self.config, state.stats
        if state.daily_quota_error:
            error = f"not sent: {state.daily_quota_error}"
            return _Outcome(request, "failed", error=error, details={"retries": 0})
        if config.budget_usd is None:
            return None
        committed = stats.spent_usd + state.reserved_usd
        if committed + config.expected_image_usd() <= config.budget_usd + 1e-12:
            return None
        if not stats.budget_reached:
            logger.warning(
                "Gemini budget of $%.4f reached ($%.4f spent or committed): no more requests "
                "are sent in this run.",
                config.budget_usd,
                committed,
            )
        stats.budget_reached = True
        stats.skipped_budget += 1
        error = (
            f"budget reached: ${config.budget_usd:.4f} per run, ${committed:.4f} spent or "
            f"committed, ${config.expected_image_usd():.4f} expected per image; not sent"
        )
        return _Outcome(request, "skipped_budget", error=error)

    async def _request(
        self, client: genai.Client, request: ImageRequest, state: _RunState
    ) -> _Outcome:
        """One image: calls until an answer, a final error or the retry limit."""
        config, stats = self.config, state.stats
        call_config = image_call_config(request)
        aspect_ratio = call_config.image_config.aspect_ratio if call_config.image_config else None
        retries = 0
        call_seconds = 0.0
        started_at = utc_now()
        while True:
            sent = await self._send(client, request, call_config, state)
            if sent is None:  # a daily quota ran out while this request waited: never sent
                state.reserved_usd -= config.expected_image_usd()
                return _Outcome(
                    request,
                    "failed",
                    error=f"not sent: {state.daily_quota_error}",
                    seconds=call_seconds,
                    details={"retries": retries},
                )
            response, failure, seconds = sent
            call_seconds += seconds
            details: dict[str, Any] = {
                "retries": retries,
                "aspect_ratio": aspect_ratio,
                "started_at": started_at,
            }
            if failure is None:
                answer = read_answer(response, config)
                details.update(answer.details)
                state.reserved_usd -= config.expected_image_usd()
                stats.spent_usd += details["cost_usd"] or 0.0
                stats.prompt_tokens += details["prompt_tokens"] or 0
                stats.output_tokens += details["output_tokens"] or 0
                return _Outcome(
                    request,
                    answer.status,
                    image_bytes=answer.image_bytes,
                    error=answer.error,
                    seconds=call_seconds,
                    details=details,
                )
            stats.errors_by_status[failure.kind] += 1
            if failure.daily_quota:
                if not state.daily_quota_error:
                    logger.error(
                        "Gemini %s; no more requests are sent in this run.", failure.message
                    )
                state.daily_quota_error = failure.message
                stats.daily_quota_exhausted = True
            if failure.daily_quota or not failure.retryable or retries + 1 >= config.max_attempts:
                state.reserved_usd -= config.expected_image_usd()
                after = f" (after {retries} retries)" if retries else ""
                details["http_status"] = failure.kind
                return _Outcome(
                    request,
                    "failed",
                    error=f"{failure.message}{after}",
                    seconds=call_seconds,
                    details=details,
                )
            retries += 1
            stats.retries += 1
            await asyncio.sleep(
                backoff_seconds(
                    retries,
                    config.initial_backoff_seconds,
                    config.max_backoff_seconds,
                    failure.retry_after,
                    self._random,
                )
            )

    async def _send(
        self,
        client: genai.Client,
        request: ImageRequest,
        call_config: types.GenerateContentConfig,
        state: _RunState,
    ) -> tuple[Any, CallFailure | None, float] | None:
        """One HTTP call: (response, failure, seconds), or None when it must not be sent."""
        config, stats = self.config, state.stats
        async with state.http_slots:
            # Slot first, then token: a call leaves the moment it gets its token, so calls stay
            # evenly spaced even when several slots free up at once.
            if not state.daily_quota_error:
                await state.bucket.acquire()
            if state.daily_quota_error:
                return None
            state.in_flight += 1
            stats.http_calls += 1
            stats.max_in_flight = max(stats.max_in_flight, state.in_flight)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(config.timeout_seconds):
                    response = await client.aio.models.generate_content(
                        model=config.model, contents=request_contents(request), config=call_config
                    )
                return response, None, time.perf_counter() - started
            except Exception as exc:  # classified: retried, failed or a daily quota
                return None, classify_error(exc, config), time.perf_counter() - started
            finally:
                state.in_flight -= 1
