"""The one place a google-genai client for the Gemini API is built, and the key kept out of text.

The image backend and the prompt enhancer both call Gemini; they differ only in who retries.
The enhancer lets the SDK retry (``HttpRetryOptions`` with a few attempts); the image backend
passes ``attempts=1`` and retries itself, so that every retry is paced and counted. Everything
else (API version, endpoint, timeout, which statuses are worth a retry) is decided here once.

The API key goes to the SDK and nowhere else: :func:`redact` removes it from any text (an error
message, a log line) before that text is kept.
"""

from __future__ import annotations

import importlib
from typing import Any

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

API_VERSION = "v1beta"  # the version Google documents image generation and system prompts under
# The statuses google-genai retries by default: request timeout, too many requests, and the
# server errors that mean "try again later". Everything else (400, 401, 403, 404) will not change.
RETRYABLE_STATUS_CODES = (408, 429, 500, 502, 503, 504)
REDACTED = "[redacted]"


def make_gemini_client(
    api_key: str,
    *,
    base_url: str | None,
    timeout_seconds: float,
    retry_options: types.HttpRetryOptions,
) -> genai.Client:
    """A client for the Gemini Developer API (or another endpoint speaking it, e.g. a fake).

    ``timeout_seconds`` bounds each HTTP attempt; ``retry_options`` says how the SDK retries.
    """
    http_options = types.HttpOptions(
        base_url=base_url,
        api_version=API_VERSION,
        timeout=int(timeout_seconds * 1000),  # the SDK counts milliseconds
        retry_options=retry_options,
    )
    return genai.Client(api_key=api_key, http_options=http_options)


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced by a placeholder."""
    return text.replace(secret, REDACTED) if secret else text


def _installed(*names: str) -> tuple[type[BaseException], ...]:
    """The classes ``module.Class`` among ``names`` whose library is installed."""
    classes: list[type[BaseException]] = []
    for name in names:
        module_name, _, class_name = name.rpartition(".")
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


# The SDK sends through httpx or its fork httpx2 (two unrelated sets of classes with the same
# names), and its async client through aiohttp instead when aiohttp is installed.
# Anything the HTTP layer raises: timeouts, refused connections, broken responses.
TRANSPORT_ERRORS = _installed(
    "httpx2.TransportError",
    "httpx.TransportError",
    "aiohttp.ClientConnectionError",
    "aiohttp.ClientPayloadError",
)
# What HttpRetryOptions retries besides RETRYABLE_STATUS_CODES (fixed by the SDK): a timeout, a
# connection that could not be made or was dropped.
SDK_RETRIED_ERRORS = _installed(
    "httpx2.TimeoutException",
    "httpx2.ConnectError",
    "httpx.TimeoutException",
    "httpx.ConnectError",
    "aiohttp.ClientConnectorError",
    "aiohttp.ClientOSError",
    "aiohttp.ServerDisconnectedError",
)
# No connection could be made at all: refused, unknown host, no route, connect timed out.
CONNECT_ERRORS = _installed(
    "httpx2.ConnectError",
    "httpx2.ConnectTimeout",
    "httpx.ConnectError",
    "httpx.ConnectTimeout",
    "aiohttp.ClientConnectorError",
)


# What an error answer says, for the backend and the enhancer alike.


def error_details(exc: genai_errors.APIError) -> list[dict[str, Any]]:
    """The ``google.rpc`` detail messages of an API error (RetryInfo, QuotaFailure, ...)."""
    body = exc.details
    if isinstance(body, dict):
        error = body.get("error", body)
        details = error.get("details") if isinstance(error, dict) else None
        if isinstance(details, list):
            return [detail for detail in details if isinstance(detail, dict)]
    return []


def detail_type(detail: dict[str, Any]) -> str:
    """The message type of a detail: "type.googleapis.com/google.rpc.RetryInfo" ->
    "google.rpc.RetryInfo"."""
    return str(detail.get("@type", "")).rpartition("/")[2]


def daily_quota_ids(details: list[dict[str, Any]]) -> list[str]:
    """The per-day quotas a QuotaFailure says were exceeded (empty for per-minute ones)."""
    quota_ids = []
    for detail in details:
        if detail_type(detail) != "google.rpc.QuotaFailure":
            continue
        for violation in detail.get("violations") or []:
            quota = f"{violation.get('quotaId', '')} {violation.get('quotaMetric', '')}"
            if "perday" in quota.lower().replace("_", "").replace("-", ""):
                quota_ids.append(violation.get("quotaId") or quota.strip())
    return quota_ids


def error_reasons(details: list[dict[str, Any]]) -> set[str]:
    """The reasons of the ErrorInfo details, e.g. {"API_KEY_INVALID"} for a bad key."""
    return {
        str(detail.get("reason"))
        for detail in details
        if detail_type(detail) == "google.rpc.ErrorInfo" and detail.get("reason")
    }
