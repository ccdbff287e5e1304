"""Why a Gemini call failed, and what to do about it: retry (and when), give up, or stop the run.

:func:`classify_error` turns whatever one call raised into a :class:`CallFailure`:

- an API error keeps its HTTP status; 408, 429 and 5xx are retryable. The delay the server asks
  for comes from the body's ``google.rpc.RetryInfo`` or else a ``Retry-After`` header.
- a 429 whose ``google.rpc.QuotaFailure`` names a per-day quota is a *daily quota*: it resets at
  midnight Pacific time, so it is never retried and no more requests are sent in the run.
- timeouts and network errors are retryable; an unparsable answer is not.

Every message is clipped and has the API key redacted: servers do echo keys in error texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

from google.genai import errors as genai_errors

from imagegen_pipeline.backends.gemini.settings import GeminiSettings
from imagegen_pipeline.gemini_client import (
    RETRYABLE_STATUS_CODES,
    TRANSPORT_ERRORS,
    daily_quota_ids,
    detail_type,
    error_details,
    redact,
)

MISSING_KEY_MESSAGE = (
    "GEMINI_API_KEY is not set: export GEMINI_API_KEY=... "
    "(get a key at https://aistudio.google.com/apikey) or leave the gemini backend out"
)
MAX_ERROR_CHARS = 600  # error texts go into Parquet cells and logs


class GeminiKeyMissingError(ValueError):
    """No API key was given; the message says how to set one."""


class GeminiBackendError(RuntimeError):
    """The backend itself broke (not one request); the message has the key redacted."""


@dataclass(frozen=True)
class CallFailure:
    """Why one HTTP call failed, and what to do about it."""

    kind: str  # the HTTP status ("429"), "timeout", "network", "response" or "error"
    message: str
    retryable: bool
    retry_after: float | None = None  # the delay the server asked for, in seconds
    daily_quota: bool = False


def clip(text: str) -> str:
    """``text`` cut to at most MAX_ERROR_CHARS characters."""
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


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


def retry_delay(exc: genai_errors.APIError, details: list[dict[str, Any]]) -> float | None:
    """The seconds the server asked to wait: RetryInfo in the body, else Retry-After."""
    for detail in details:
        if detail_type(detail) == "google.rpc.RetryInfo":
            delay = _parse_duration(detail.get("retryDelay"))
            if delay is not None:
                return delay
    headers = getattr(getattr(exc, "response", None), "headers", None)
    return _parse_retry_after(headers.get("retry-after")) if headers is not None else None


def classify_error(exc: BaseException, settings: GeminiSettings) -> CallFailure:
    """What one call's exception means (see the module docstring); the key is redacted."""

    def text(message: str) -> str:
        return clip(redact(message, settings.api_key))

    if isinstance(exc, genai_errors.APIError):
        code = int(exc.code or 0)
        details = error_details(exc)
        message = f"HTTP {code} {exc.status or ''}: {exc.message or exc.details}".strip()
        quotas = daily_quota_ids(details) if code == 429 else []
        if quotas:
            message = f"daily quota exhausted ({', '.join(quotas)}): {message}"
            return CallFailure(str(code), text(message), retryable=False, daily_quota=True)
        return CallFailure(
            str(code), text(message), code in RETRYABLE_STATUS_CODES, retry_delay(exc, details)
        )
    if isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower():
        return CallFailure("timeout", f"timed out after {settings.timeout_seconds:g} s", True)
    described = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TRANSPORT_ERRORS):
        return CallFailure("network", text(f"network error: {described}"), True)
    if isinstance(exc, ValueError):  # json.JSONDecodeError and the SDK's response errors
        return CallFailure("response", text(f"malformed response: {described}"), False)
    return CallFailure("error", text(described), False)
