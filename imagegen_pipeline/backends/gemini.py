"""Gemini image generation (``gemini-2.5-flash-image``) through the official google-genai SDK.

One ``generateContent`` call per image, with ``responseModalities=["IMAGE"]``, the aspect ratio
nearest to the requested size and the request's seed. The calls run concurrently on a private
event loop in a helper thread, paced by a token bucket, retried with exponential backoff and full
jitter on 408/429/5xx and timeouts (the SDK's own retries are off so that every retry is counted
and paced), and stopped early by a per-run budget or an exhausted daily quota.

Every request ends in exactly one result: ``ok`` (an image), ``blocked`` (the model answered
without an image: a safety refusal, NO_IMAGE, text only, a blocked prompt; never a placeholder),
``failed`` (an error, with its text) or ``skipped_budget``.

Negative prompts: Gemini has no negative-prompt parameter, and this backend does not fold one
into the prompt text ("Avoid: ..."). Google's prompting guide for image generation recommends
describing the wanted scene positively ("semantic negative prompts") because naming a concept,
even to exclude it, tends to put it in the picture; the per-style negatives of the template
enhancer ("text, watermark, blurry, ...") are tuned for diffusion models' classifier-free
guidance and would do exactly that here. ``supports_negative_prompt`` is therefore False, and
the pipeline records an empty negative prompt for Gemini images, which keeps their content
addresses honest.

The API key is never logged, printed or recorded: it is excluded from reprs and scrubbed from
every error text this module records.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import logging
import math
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image

from imagegen_pipeline.backends.base import (
    GenerationSettings,
    ImageBackend,
    ImageRequest,
    ImageResult,
)
from imagegen_pipeline.run_metadata import utc_now

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemini-2.5-flash-image"
API_VERSION = "v1beta"  # the version Google documents image generation under
MISSING_KEY_MESSAGE = (
    "GEMINI_API_KEY is not set: export GEMINI_API_KEY=... "
    "(get a key at https://aistudio.google.com/apikey) or leave the gemini backend out"
)
REDACTED = "[redacted]"

# Prices of gemini-2.5-flash-image on https://ai.google.dev/gemini-api/docs/pricing (paid tier):
# input $0.30 per 1M tokens; image output $30 per 1M tokens, where an image up to 1024x1024 px
# is 1290 tokens, i.e. about $0.039 per image; text output $2.50 per 1M tokens.
PRICE_PER_INPUT_TOKEN_USD = 0.30 / 1_000_000
PRICE_PER_OUTPUT_TOKEN_USD = 30.0 / 1_000_000
PRICE_PER_OUTPUT_TEXT_TOKEN_USD = 2.50 / 1_000_000
TOKENS_PER_IMAGE = 1290
PRICE_PER_IMAGE_USD = 0.039

# Aspect ratios gemini-2.5-flash-image accepts in imageConfig.aspectRatio.
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
RETRYABLE_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})
# Finish reasons of a candidate that holds no image; any answer without an image is "blocked".
NO_IMAGE_FINISH_REASONS = frozenset(
    {"IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "NO_IMAGE", "PROHIBITED_CONTENT", "SAFETY"}
)
# The token bucket refills slightly below the configured rate: a server counting requests in a
# sliding minute could otherwise see rpm + 1 when network jitter bunches two arrivals together.
RATE_HEADROOM = 0.98
MAX_ERROR_CHARS = 600


class GeminiKeyMissingError(ValueError):
    """No API key was given; the message says how to set one."""


class GeminiBackendError(RuntimeError):
    """The backend itself broke (not one request); the message is scrubbed of the key."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    # The SDK talks through httpx or its fork httpx2, whichever is installed; both raise
    # TransportError subclasses for timeouts, refused connections and broken responses.
    classes: list[type[BaseException]] = []
    for module_name in ("httpx2", "httpx"):
        try:
            classes.append(importlib.import_module(module_name).TransportError)
        except ImportError:
            continue
    return tuple(classes)


TRANSPORT_ERRORS = _transport_errors()


@dataclass
class GeminiConfig:
    """How the Gemini backend calls the API, paces itself and prices its calls."""

    api_key: str = field(default="", repr=False)  # never shown: excluded from the repr
    model: str = DEFAULT_MODEL
    base_url: str | None = None  # another endpoint (a proxy, a test server); None for Google
    timeout_seconds: float = 120.0  # one HTTP call; a timed-out call is retried
    max_concurrent_requests: int = 8  # HTTP calls in flight at once
    requests_per_minute: float = 60.0  # pacing of all calls, retries included
    max_retries: int = 6  # per image, on 408/429/5xx, timeouts and network errors
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    price_per_input_token_usd: float = PRICE_PER_INPUT_TOKEN_USD
    price_per_output_token_usd: float = PRICE_PER_OUTPUT_TOKEN_USD  # image output tokens
    price_per_output_text_token_usd: float = PRICE_PER_OUTPUT_TEXT_TOKEN_USD
    # Expected cost of one image: what the budget check reserves before each request, and the
    # cost recorded for an image whose response carries no usage metadata.
    price_per_image_usd: float = PRICE_PER_IMAGE_USD
    budget_usd: float | None = None  # per-run cap; None: no cap

    def __post_init__(self) -> None:
        if not (self.api_key or "").strip():
            raise GeminiKeyMissingError(MISSING_KEY_MESSAGE)
        self.api_key = self.api_key.strip()
        positive = {
            "timeout_seconds": self.timeout_seconds,
            "max_concurrent_requests": self.max_concurrent_requests,
            "requests_per_minute": self.requests_per_minute,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"GeminiConfig.{name} must be positive, got {value}")
        if self.max_retries < 0:
            raise ValueError(f"GeminiConfig.max_retries must be >= 0, got {self.max_retries}")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ValueError(f"GeminiConfig.budget_usd must be >= 0, got {self.budget_usd}")


@dataclass
class GeminiRunStats:
    """What one ``generate`` call did, for logs, asset metadata and the benchmark."""

    http_calls: int = 0
    retries: int = 0
    errors_by_status: Counter[str] = field(default_factory=Counter)  # "429", "503", "timeout"
    max_in_flight: int = 0
    spent_usd: float = 0.0
    budget_reached: bool = False
    daily_quota_exhausted: bool = False


def aspect_ratio_for(width: int, height: int) -> str:
    """The supported aspect ratio nearest to ``width`` x ``height`` (compared on a log scale)."""
    wanted = math.log(width / height)

    def distance(ratio: str) -> float:
        w, h = ratio.split(":")
        return abs(math.log(int(w) / int(h)) - wanted)

    return min(ASPECT_RATIOS, key=distance)


def scrub(text: str, secret: str) -> str:
    """``text`` with every occurrence of ``secret`` replaced by a placeholder."""
    return text.replace(secret, REDACTED) if secret else text


def _enum_name(value: Any) -> str:
    """An SDK enum's name ("IMAGE_SAFETY"), or the raw string, or ""."""
    if value is None:
        return ""
    return str(getattr(value, "value", value))


def _parse_duration(value: Any) -> float | None:
    """Seconds of a google.protobuf.Duration as JSON ("1.5s") or as {"seconds", "nanos"}."""
    try:
        if isinstance(value, str) and value.endswith("s"):
            return float(value[:-1])
        if isinstance(value, dict):
            return float(value.get("seconds", 0)) + float(value.get("nanos", 0)) / 1e9
    except ValueError:
        return None
    return None


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds of a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(when.tzinfo)).total_seconds())


def _error_details(exc: genai_errors.APIError) -> list[dict[str, Any]]:
    """The google.rpc detail messages of an API error (RetryInfo, QuotaFailure, ...)."""
    body = exc.details
    if isinstance(body, dict):
        error = body.get("error", body)
        details = error.get("details") if isinstance(error, dict) else None
        if isinstance(details, list):
            return [detail for detail in details if isinstance(detail, dict)]
    return []


@dataclass(frozen=True)
class CallFailure:
    """Why one HTTP call failed, and what to do about it."""

    kind: str  # the HTTP status ("429"), "timeout", "network" or "response"
    message: str
    retryable: bool
    retry_after: float | None = None  # the delay the server asked for, in seconds
    daily_quota: bool = False


def classify_error(exc: BaseException, config: GeminiConfig) -> CallFailure:
    """Turn an exception of one call into a :class:`CallFailure` (text scrubbed of the key)."""
    if isinstance(exc, genai_errors.APIError):
        code = int(exc.code or 0)
        details = _error_details(exc)
        retry_after = None
        daily_quota_ids = []
        for detail in details:
            kind = str(detail.get("@type", ""))
            if kind.endswith("google.rpc.RetryInfo"):
                retry_after = _parse_duration(detail.get("retryDelay"))
            elif kind.endswith("google.rpc.QuotaFailure"):
                for violation in detail.get("violations") or []:
                    quota = f"{violation.get('quotaId', '')} {violation.get('quotaMetric', '')}"
                    # Per-day quotas only reset at midnight Pacific time: retrying is pointless.
                    if "perday" in quota.lower().replace("_", "").replace("-", ""):
                        daily_quota_ids.append(violation.get("quotaId") or quota.strip())
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        if retry_after is None and headers is not None:
            retry_after = _parse_retry_after(headers.get("retry-after"))
        message = f"HTTP {code} {exc.status or ''}: {exc.message or exc.details}".strip()
        if code == 429 and daily_quota_ids:
            message = f"daily quota exhausted ({', '.join(daily_quota_ids)}): {message}"
            return CallFailure(str(code), _clip(scrub(message, config.api_key)), False, None, True)
        return CallFailure(
            str(code),
            _clip(scrub(message, config.api_key)),
            code in RETRYABLE_STATUS_CODES,
            retry_after,
        )
    if isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower():
        return CallFailure("timeout", f"timed out after {config.timeout_seconds:g} s", True)
    if isinstance(exc, TRANSPORT_ERRORS):
        text = scrub(f"{type(exc).__name__}: {exc}", config.api_key)
        return CallFailure("network", _clip(f"network error: {text}"), True)
    if isinstance(exc, ValueError):  # json.JSONDecodeError and the SDK's response errors
        text = scrub(f"{type(exc).__name__}: {exc}", config.api_key)
        return CallFailure("response", _clip(f"malformed response: {text}"), False)
    text = scrub(f"{type(exc).__name__}: {exc}", config.api_key)
    return CallFailure("error", _clip(text), False)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


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

    def __init__(self, config: GeminiConfig, stats: GeminiRunStats) -> None:
        self.bucket = TokenBucket(config.requests_per_minute * RATE_HEADROOM / 60.0)
        self.http_slots = asyncio.Semaphore(config.max_concurrent_requests)
        self.in_flight = 0
        self.reserved_usd = 0.0  # expected cost of the images issued and not finished yet
        self.daily_quota_error = ""  # set once a daily quota is exhausted: nothing more is sent
        self.stats = stats


class GeminiBackend(ImageBackend):
    """Images from the Gemini API, many requests in flight, paced, retried and budgeted."""

    name = "gemini"
    default_width = 1024
    default_height = 1024
    supports_negative_prompt = False  # see the module docstring
    token_limit = None

    def __init__(self, config: GeminiConfig) -> None:
        self.config = config
        self.last_run = GeminiRunStats()
        self._random = random.Random()

    def __repr__(self) -> str:
        return f"GeminiBackend(model={self.config.model!r}, base_url={self.config.base_url!r})"

    @property
    def settings(self) -> GenerationSettings:
        # A hosted model has no revision to pin and no steps or guidance to set.
        return GenerationSettings(
            backend=self.name, model_id=self.config.model, revision="api", steps=0, guidance=0.0
        )

    @property
    def device(self) -> str:
        return "remote"

    def generate(self, requests: Sequence[ImageRequest]) -> Iterator[ImageResult]:
        """Yield one result per request, in the order they complete.

        The HTTP calls run on a private event loop in a helper thread while the caller handles
        the results (writes PNGs); at most a few finished images wait in between, so memory
        stays flat however many prompts there are.
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
                message = scrub(f"{type(error).__name__}: {error}", self.config.api_key)
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

    def _client(self) -> genai.Client:
        http_options = types.HttpOptions(
            base_url=self.config.base_url,
            api_version=API_VERSION,
            timeout=int(self.config.timeout_seconds * 1000),
            # One attempt per SDK call: this backend retries, so retries are paced and counted.
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        return genai.Client(api_key=self.config.api_key, http_options=http_options)

    async def _produce(
        self, todo: list[ImageRequest], outbox: queue.Queue[Any], credits: asyncio.Semaphore
    ) -> None:
        """Issue the requests in order, at most a bounded number of them alive at once."""
        config, stats = self.config, self.last_run
        state = _RunState(config, stats)
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
                    text = scrub(f"{type(exc).__name__}: {exc}", config.api_key)
                    outcome = _Outcome(request, "failed", error=_clip(f"internal error: {text}"))
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
                state.reserved_usd += config.price_per_image_usd
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
        config = self.config
        if state.daily_quota_error:
            error = f"not sent: {state.daily_quota_error}"
            return _Outcome(request, "failed", error=error, details={"retries": 0})
        if config.budget_usd is None:
            return None
        committed = state.stats.spent_usd + state.reserved_usd
        if committed + config.price_per_image_usd <= config.budget_usd + 1e-12:
            return None
        if not state.stats.budget_reached:
            logger.warning(
                "Gemini budget of $%.4f reached ($%.4f spent or committed): no more requests "
                "are sent in this run.",
                config.budget_usd,
                committed,
            )
        state.stats.budget_reached = True
        error = (
            f"budget reached: ${config.budget_usd:.4f} per run, ${committed:.4f} spent or "
            f"committed, ${config.price_per_image_usd:.4f} expected per image; not sent"
        )
        return _Outcome(request, "skipped_budget", error=error)

    async def _request(
        self, client: genai.Client, request: ImageRequest, state: _RunState
    ) -> _Outcome:
        """One image: calls until an answer, a final error or the retry limit."""
        config, stats = self.config, state.stats
        aspect_ratio = aspect_ratio_for(request.width, request.height)
        generation_config = types.GenerateContentConfig(
            response_modalities=["IMAGE"],
            image_config=types.ImageConfig(aspect_ratio=aspect_ratio),
            seed=request.seed,
            # No tools are sent; disabling AFC also drops the SDK's INFO line on every call.
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        )
        retries = 0
        call_seconds = 0.0
        started_at = utc_now()
        while True:
            sent = await self._send(client, request, generation_config, state)
            if sent is None:  # a daily quota ran out while this request waited: never sent
                state.reserved_usd -= config.price_per_image_usd
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
                outcome = self._interpret(request, response, details)
                outcome.seconds = call_seconds
                state.reserved_usd -= config.price_per_image_usd
                stats.spent_usd += outcome.details.get("cost_usd") or 0.0
                return outcome
            stats.errors_by_status[failure.kind] += 1
            if failure.daily_quota:
                if not state.daily_quota_error:
                    logger.error(
                        "Gemini %s; no more requests are sent in this run.", failure.message
                    )
                state.daily_quota_error = failure.message
                stats.daily_quota_exhausted = True
            if failure.daily_quota or not failure.retryable or retries >= config.max_retries:
                state.reserved_usd -= config.price_per_image_usd
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
            await asyncio.sleep(self._backoff(retries, failure.retry_after))

    async def _send(
        self,
        client: genai.Client,
        request: ImageRequest,
        generation_config: types.GenerateContentConfig,
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
                        model=config.model, contents=request.prompt, config=generation_config
                    )
                return response, None, time.perf_counter() - started
            except Exception as exc:  # classified: retried, failed or a daily quota
                return None, classify_error(exc, config), time.perf_counter() - started
            finally:
                state.in_flight -= 1

    def _backoff(self, retry: int, server_delay: float | None) -> float:
        """Full-jitter exponential backoff, never shorter than the delay the server asked for."""
        config = self.config
        ceiling = min(config.max_backoff_seconds, config.initial_backoff_seconds * 2 ** (retry - 1))
        delay = self._random.uniform(0.0, ceiling)
        return max(delay, server_delay) if server_delay is not None else delay

    def _interpret(
        self, request: ImageRequest, response: types.GenerateContentResponse, details: dict
    ) -> _Outcome:
        """An answer: an image (ok), or no image (blocked, with the reason and any text)."""
        prompt_tokens, output_tokens, cost = self._usage(response.usage_metadata)
        details.update(prompt_tokens=prompt_tokens, output_tokens=output_tokens, cost_usd=cost)
        feedback = response.prompt_feedback
        block_reason = _enum_name(feedback.block_reason) if feedback else ""
        candidates = response.candidates or []
        candidate = candidates[0] if candidates else None
        finish_reason = _enum_name(candidate.finish_reason) if candidate else ""
        image_bytes = None
        texts: list[str] = []
        parts = candidate.content.parts if candidate and candidate.content else None
        for part in parts or []:
            blob = part.inline_data
            if blob is not None and blob.data and (blob.mime_type or "").startswith("image/"):
                image_bytes = blob.data
                break
            if part.text and not part.thought:
                texts.append(part.text.strip())
        details["finish_reason"] = finish_reason or block_reason
        if image_bytes is not None and not block_reason:
            if cost is None:  # no usage metadata: charge the expected price of an image
                details["cost_usd"] = self.config.price_per_image_usd
            return _Outcome(request, "ok", image_bytes=image_bytes, details=details)
        if block_reason:
            reason = f"prompt blocked (blockReason {block_reason})"
        elif finish_reason in NO_IMAGE_FINISH_REASONS:
            reason = f"no image (finishReason {finish_reason})"
        elif texts:
            reason = f"no image, text only (finishReason {finish_reason or 'n/a'})"
        else:
            reason = f"no image in the response (finishReason {finish_reason or 'n/a'})"
        message = getattr(candidate, "finish_message", None) if candidate else None
        said = " ".join(text for text in [message or "", *texts] if text)
        error = f"{reason}: {said}" if said else reason
        details["cost_usd"] = details["cost_usd"] or 0.0
        return _Outcome(
            request, "blocked", error=_clip(scrub(error, self.config.api_key)), details=details
        )

    def _usage(self, usage: Any) -> tuple[int | None, int | None, float | None]:
        """(prompt tokens, output tokens, cost in USD) of one response; Nones when unknown."""
        if usage is None:
            return None, None, None
        config = self.config
        prompt_tokens = usage.prompt_token_count or 0
        candidates_tokens = usage.candidates_token_count or 0
        thoughts_tokens = usage.thoughts_token_count or 0
        image_tokens = candidates_tokens
        text_tokens = thoughts_tokens  # thinking is billed as text output
        if usage.candidates_tokens_details:
            # Per-modality counts: image tokens at the image price, the rest at the text price.
            image_tokens = sum(
                detail.token_count or 0
                for detail in usage.candidates_tokens_details
                if _enum_name(detail.modality) == "IMAGE"
            )
            text_tokens += candidates_tokens - image_tokens
        cost = (
            prompt_tokens * config.price_per_input_token_usd
            + image_tokens * config.price_per_output_token_usd
            + text_tokens * config.price_per_output_text_token_usd
        )
        return prompt_tokens, candidates_tokens + thoughts_tokens, cost
