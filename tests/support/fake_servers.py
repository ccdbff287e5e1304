"""Local HTTP servers that speak the Gemini and Ollama REST APIs, for tests and benchmarks.

:class:`FakeGemini` answers ``POST /{version}/models/{model}:generateContent`` the way the
Gemini API documents it: an image model answers with ``candidates[].content.parts[].inlineData``
holding a real PNG (drawn from the request's seed and prompt, so images differ), ``finishReason``
and ``usageMetadata``; a text model answers with text. Faults are injected per prompt (a
scripted list, consumed one per request) or for every request, and a server-side
requests-per-window quota and a random 429 rate model real rate limiting. Every request is
recorded (path, headers, JSON body, arrival time) for tests to assert on.

:class:`FakeOllama` answers ``POST /api/generate`` (non-streaming) like a local Ollama.

Both run a stdlib ``ThreadingHTTPServer`` in a background thread on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

# Faults FakeGemini can inject; "ok" is a normal answer.
GEMINI_FAULTS = (
    "ok",
    "rate_limit",  # 429 RESOURCE_EXHAUSTED with a per-minute QuotaFailure and RetryInfo
    "rate_limit_header",  # 429 with a Retry-After header and no RetryInfo
    "daily_quota",  # 429 with a per-day QuotaFailure (quotaId ...PerDay...)
    "server_error",  # 500 INTERNAL
    "bad_gateway",  # 502
    "unavailable",  # 503 UNAVAILABLE
    "hang",  # no answer for hang_seconds (past the client's timeout)
    "malformed",  # 200 with a body that is not JSON
    "image_safety",  # finishReason IMAGE_SAFETY, no image
    "image_prohibited",  # finishReason IMAGE_PROHIBITED_CONTENT, no image
    "no_image",  # finishReason NO_IMAGE, no image
    "text_only",  # finishReason STOP, a text part and no image
    "prompt_blocked",  # promptFeedback.blockReason, no candidates
    "bad_key",  # 400 INVALID_ARGUMENT whose message echoes the API key it was sent
    "empty_text",  # a text model's answer with an empty text part
)
OLLAMA_FAULTS = ("ok", "server_error", "model_missing", "empty", "hang", "malformed")

IMAGE_TOKENS = 1290  # what gemini-2.5-flash-image reports per image up to 1024x1024
# A key shaped like a real one, unique enough that finding it anywhere means it leaked.
FAKE_GEMINI_KEY = "AIzaSyFAKE-test-key-0123456789-never-log-me"


@dataclass
class RecordedRequest:
    """One request a fake server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body, or the raw text when it was not JSON
    received_at: float  # time.monotonic() on arrival
    status: int = 0  # the HTTP status answered (0 while in progress)
    fault: str = ""

    @property
    def prompt(self) -> str:
        """The text of the last content of a Gemini request, or an Ollama request's prompt."""
        if not isinstance(self.body, dict):
            return ""
        if "prompt" in self.body:
            return str(self.body["prompt"])
        contents = self.body.get("contents") or []
        parts = contents[-1].get("parts", []) if contents else []
        return " ".join(part.get("text", "") for part in parts)

    @property
    def generation_config(self) -> dict[str, Any]:
        """The ``generationConfig`` of a Gemini request ({} when absent)."""
        return self.body.get("generationConfig", {}) if isinstance(self.body, dict) else {}


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeServer/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # the stdlib signature
        pass  # keep test output clean

    def _handle(self) -> None:
        owner: _FakeServer = self.server.owner  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        record = RecordedRequest(
            self.command, self.path, dict(self.headers.items()), body, time.monotonic()
        )
        owner._enter(record)
        try:
            status, headers, payload = owner.respond(record)
            record.status = status
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test); nothing to answer
        finally:
            owner._leave(record)

    do_GET = _handle
    do_POST = _handle


class _FakeServer(ABC):
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread, recording every request."""

    def __init__(self, *, latency: float = 0.0, hang_seconds: float = 10.0) -> None:
        self.latency = latency
        self.hang_seconds = hang_seconds
        self.requests: list[RecordedRequest] = []
        self.responses: Counter[int] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._scripts: dict[str, list[str]] = {}
        self.default_fault = "ok"
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    def start(self) -> _FakeServer:
        """Listen on a free port of 127.0.0.1."""
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.owner = self  # type: ignore[attr-defined]
        self._httpd = httpd
        # A short poll interval makes stop() quick; the default 0.5 s adds up over a suite.
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening; hung handlers are woken up and finish."""
        self._closing.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        assert self._httpd is not None, "start the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # --- faults ---

    def script(self, match: str, *faults: str) -> None:
        """Answer requests whose prompt contains ``match`` with ``faults``, one per request.

        After the list is used up the prompt gets the default answer ("ok" unless changed).
        """
        for fault in faults:
            self._check_fault(fault)
        with self._lock:
            self._scripts[match] = list(faults)

    @abstractmethod
    def _check_fault(self, fault: str) -> None:
        """Raise ValueError for a fault name this server does not know."""

    def _next_fault(self, prompt: str) -> str:
        with self._lock:
            for match, faults in self._scripts.items():
                if match in prompt and faults:
                    return faults.pop(0)
        return self.default_fault

    def _wait(self, seconds: float) -> None:
        """Sleep, but wake up when the server stops."""
        if seconds > 0:
            self._closing.wait(seconds)

    # --- bookkeeping ---

    def _enter(self, record: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(record)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self, record: RecordedRequest) -> None:
        with self._lock:
            self.in_flight -= 1
            self.responses[record.status] += 1

    @abstractmethod
    def respond(self, record: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of the answer to ``record``."""

    def requests_for(self, match: str) -> list[RecordedRequest]:
        """The recorded requests whose prompt contains ``match``."""
        with self._lock:
            return [request for request in self.requests if match in request.prompt]


def _json(status: int, body: Any, headers: dict[str, str] | None = None):
    return (
        status,
        {"Content-Type": "application/json", **(headers or {})},
        json.dumps(body).encode(),
    )


def google_error(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A Google API error body (google.rpc.Status as JSON)."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def quota_failure(quota_id: str, metric: str, value: str) -> dict[str, Any]:
    """A google.rpc.QuotaFailure detail naming one violated quota."""
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
            {
                "quotaMetric": metric,
                "quotaId": quota_id,
                "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash-image"},
                "quotaValue": value,
            }
        ],
    }


def retry_info(seconds: float) -> dict[str, Any]:
    """A google.rpc.RetryInfo detail asking to retry after ``seconds``."""
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{seconds:g}s"}


def png_for(seed: int, prompt: str, aspect_ratio: str = "1:1", side: int = 64) -> bytes:
    """A small real PNG whose colours follow the seed and the prompt, in the aspect ratio."""
    w, h = (int(x) for x in aspect_ratio.split(":")) if ":" in aspect_ratio else (1, 1)
    width, height = (
        (side, max(8, round(side * h / w))) if w >= h else (max(8, round(side * w / h)), side)
    )
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    image = Image.new("RGB", (width, height), tuple(digest[:3]))
    # A second colour in one quadrant, so images are not flat.
    image.paste(tuple(digest[3:6]), (0, 0, width // 2, height // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class FakeGemini(_FakeServer):
    """A local Gemini API: image and text ``generateContent`` with injectable faults."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        latency: float = 0.0,
        rpm_quota: int | None = None,
        quota_window_seconds: float = 60.0,
        random_429_rate: float = 0.0,
        random_seed: int = 0,
        hang_seconds: float = 10.0,
        retry_delay_seconds: float = 0.2,
        image_side: int = 64,
    ) -> None:
        super().__init__(latency=latency, hang_seconds=hang_seconds)
        self.api_key = api_key  # when set, other keys get 400 API_KEY_INVALID
        self.rpm_quota = rpm_quota  # requests accepted per quota window; None: unlimited
        self.quota_window_seconds = quota_window_seconds
        self.random_429_rate = random_429_rate
        self.retry_delay_seconds = retry_delay_seconds
        self.image_side = image_side
        self._random = random.Random(random_seed)
        self._accepted: list[float] = []  # arrival times of requests counted by the quota
        self.quota_rejections = 0
        self.random_rejections = 0
        # What a text model answers, from the request's last user text.
        self.text_reply: Callable[[str], str] = default_text_reply

    def _check_fault(self, fault: str) -> None:
        if fault not in GEMINI_FAULTS:
            raise ValueError(f"unknown Gemini fault {fault!r}; known: {GEMINI_FAULTS}")

    def respond(self, record: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        match = re.fullmatch(r"/(v1beta|v1)/models/([^/:]+):generateContent", record.path)
        if record.method != "POST" or match is None:
            return _json(404, google_error(404, "NOT_FOUND", f"no route {record.path}"))
        model = match.group(2)
        key = record.headers.get("x-goog-api-key") or record.headers.get("X-Goog-Api-Key")
        if self.api_key is not None and key != self.api_key:
            return _json(400, google_error(400, "INVALID_ARGUMENT", "API key not valid."))
        if not isinstance(record.body, dict) or "contents" not in record.body:
            return _json(400, google_error(400, "INVALID_ARGUMENT", "contents is required"))

        # Rate limits answer at once, like the real front end, before any work is done.
        limited = self._rate_limited(record)
        if limited is not None:
            record.fault = "quota"
            return limited
        fault = self._next_fault(record.prompt)
        record.fault = fault
        if fault == "hang":
            self._wait(self.hang_seconds)
            return _json(504, google_error(504, "DEADLINE_EXCEEDED", "hung"))
        self._wait(self.latency)
        if fault in ("rate_limit", "rate_limit_header", "daily_quota"):
            return self._quota_error(fault)
        if fault == "server_error":
            return _json(500, google_error(500, "INTERNAL", "An internal error has occurred."))
        if fault == "bad_gateway":
            return 502, {"Content-Type": "text/html"}, b"<html>502 Bad Gateway</html>"
        if fault == "unavailable":
            return _json(503, google_error(503, "UNAVAILABLE", "The model is overloaded."))
        if fault == "malformed":
            return 200, {"Content-Type": "application/json"}, b'{"candidates": [{"content": '
        if fault == "bad_key":
            message = f"API key not valid. Please pass a valid API key. Got: {key}"
            return _json(400, google_error(400, "INVALID_ARGUMENT", message))
        config = record.generation_config
        wants_image = "IMAGE" in [m.upper() for m in config.get("responseModalities") or []]
        if wants_image:
            return _json(200, self._image_answer(record, model, fault))
        return _json(200, self._text_answer(record, model, fault))

    def _rate_limited(self, record: RecordedRequest) -> tuple[int, dict[str, str], bytes] | None:
        with self._lock:
            if self.rpm_quota is not None:
                now = record.received_at
                window_start = now - self.quota_window_seconds
                self._accepted = [t for t in self._accepted if t > window_start]
                if len(self._accepted) >= self.rpm_quota:
                    self.quota_rejections += 1
                    wait = self._accepted[0] - window_start
                    details = [
                        quota_failure(
                            "GenerateRequestsPerMinutePerProjectPerModel",
                            "generativelanguage.googleapis.com/generate_requests_per_model",
                            str(self.rpm_quota),
                        ),
                        retry_info(round(wait, 3)),
                    ]
                    return _json(
                        429,
                        google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", details),
                    )
            if self.random_429_rate and self._random.random() < self.random_429_rate:
                self.random_rejections += 1
                details = [retry_info(self.retry_delay_seconds)]
                message = "Resource has been exhausted (e.g. check quota)."
                return _json(429, google_error(429, "RESOURCE_EXHAUSTED", message, details))
            if self.rpm_quota is not None:
                self._accepted.append(record.received_at)
        return None

    def _quota_error(self, fault: str) -> tuple[int, dict[str, str], bytes]:
        if fault == "rate_limit_header":
            body = google_error(429, "RESOURCE_EXHAUSTED", "Too many requests.")
            return _json(429, body, {"Retry-After": f"{self.retry_delay_seconds:g}"})
        if fault == "daily_quota":
            details = [
                quota_failure(
                    "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                    "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "100",
                ),
                retry_info(57.0),  # the real API sends one even for daily quotas
            ]
            message = "You exceeded your current quota, please check your plan and billing."
            return _json(429, google_error(429, "RESOURCE_EXHAUSTED", message, details))
        details = [
            quota_failure(
                "GenerateRequestsPerMinutePerProjectPerModel",
                "generativelanguage.googleapis.com/generate_requests_per_model",
                "10",
            ),
            retry_info(self.retry_delay_seconds),
        ]
        return _json(429, google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", details))

    @staticmethod
    def _usage(prompt: str, candidates_tokens: int, modality: str) -> dict[str, Any]:
        prompt_tokens = max(1, len(prompt) // 4)
        usage: dict[str, Any] = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": candidates_tokens,
            "totalTokenCount": prompt_tokens + candidates_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
        }
        if candidates_tokens:
            usage["candidatesTokensDetails"] = [
                {"modality": modality, "tokenCount": candidates_tokens}
            ]
        return usage

    def _image_answer(self, record: RecordedRequest, model: str, fault: str) -> dict[str, Any]:
        prompt = record.prompt
        config = record.generation_config
        base = {"modelVersion": model, "responseId": hashlib.sha1(prompt.encode()).hexdigest()}
        if fault == "prompt_blocked":
            return {
                **base,
                "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                "usageMetadata": self._usage(prompt, 0, "IMAGE"),
            }
        no_image = {
            "image_safety": "IMAGE_SAFETY",
            "image_prohibited": "IMAGE_PROHIBITED_CONTENT",
            "no_image": "NO_IMAGE",
        }
        if fault in no_image:
            candidate = {
                "finishReason": no_image[fault],
                "finishMessage": "Unable to show the generated image.",
                "index": 0,
            }
            return {
                **base,
                "candidates": [candidate],
                "usageMetadata": self._usage(prompt, 0, "IMAGE"),
            }
        if fault == "text_only":
            text = "I can't make that picture, but I can describe it: a quiet scene at dusk."
            candidate = {
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": "STOP",
                "index": 0,
            }
            return {
                **base,
                "candidates": [candidate],
                "usageMetadata": self._usage(prompt, 20, "TEXT"),
            }
        seed = int(config.get("seed") or 0)
        aspect_ratio = (config.get("imageConfig") or {}).get("aspectRatio", "1:1")
        data = base64.b64encode(png_for(seed, prompt, aspect_ratio, self.image_side)).decode()
        candidate = {
            "content": {
                "role": "model",
                "parts": [{"inlineData": {"mimeType": "image/png", "data": data}}],
            },
            "finishReason": "STOP",
            "index": 0,
        }
        return {
            **base,
            "candidates": [candidate],
            "usageMetadata": self._usage(prompt, IMAGE_TOKENS, "IMAGE"),
        }

    def _text_answer(self, record: RecordedRequest, model: str, fault: str) -> dict[str, Any]:
        prompt = record.prompt
        text = "" if fault == "empty_text" else self.text_reply(prompt)
        candidate = {
            "content": {"role": "model", "parts": [{"text": text}]},
            "finishReason": "STOP",
            "index": 0,
        }
        tokens = max(1, len(text) // 4)
        return {
            "candidates": [candidate],
            "usageMetadata": self._usage(prompt, tokens, "TEXT"),
            "modelVersion": model,
        }


def default_text_reply(message: str) -> str:
    """An LLM-like rewrite: the user's prompt (from a "Prompt:" line) made more detailed."""
    found = re.search(r"Prompt:\s*(.+)", message)
    prompt = found.group(1).strip() if found else message.strip()
    return (
        f"{prompt}, rich in detail, soft golden-hour light, carefully balanced composition, "
        "crisp textures"
    )


class FakeOllama(_FakeServer):
    """A local Ollama: ``POST /api/generate`` (stream false) and ``GET /api/tags``."""

    def __init__(
        self,
        *,
        models: tuple[str, ...] = ("llama3.2",),
        latency: float = 0.0,
        hang_seconds: float = 10.0,
    ) -> None:
        super().__init__(latency=latency, hang_seconds=hang_seconds)
        self.models = models
        self.reply: Callable[[str], str] = default_text_reply

    def _check_fault(self, fault: str) -> None:
        if fault not in OLLAMA_FAULTS:
            raise ValueError(f"unknown Ollama fault {fault!r}; known: {OLLAMA_FAULTS}")

    def respond(self, record: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        if record.method == "GET" and record.path == "/api/tags":
            return _json(200, {"models": [{"name": f"{name}:latest"} for name in self.models]})
        if record.method != "POST" or record.path != "/api/generate":
            return _json(404, {"error": f"no route {record.path}"})
        if not isinstance(record.body, dict) or not record.body.get("model"):
            return _json(400, {"error": "model is required"})
        fault = self._next_fault(record.prompt)
        record.fault = fault
        model = str(record.body["model"])
        if fault == "hang":
            self._wait(self.hang_seconds)
            return _json(500, {"error": "hung"})
        self._wait(self.latency)
        if fault == "server_error":
            return _json(500, {"error": "llama runner process has terminated: signal: killed"})
        if fault == "model_missing" or model.split(":")[0] not in self.models:
            return _json(404, {"error": f"model '{model}' not found, try pulling it first"})
        if fault == "malformed":
            return 200, {"Content-Type": "application/json"}, b"<html>proxy error</html>"
        text = "" if fault == "empty" else self.reply(record.prompt)
        return _json(
            200,
            {
                "model": model,
                "created_at": "2026-01-01T00:00:00Z",
                "response": text,
                "done": True,
                "done_reason": "stop",
                "prompt_eval_count": max(1, len(record.prompt) // 4),
                "eval_count": max(1, len(text) // 4),
            },
        )


@dataclass
class ArrivalStats:
    """How the requests a server received were spread over time."""

    count: int
    span_seconds: float
    max_in_window: int


def arrival_stats(requests: list[RecordedRequest], window_seconds: float) -> ArrivalStats:
    """Count, time span and the most requests in any ``window_seconds``."""
    times = sorted(request.received_at for request in requests)
    if not times:
        return ArrivalStats(0, 0.0, 0)
    most = 0
    start = 0
    for end, arrived in enumerate(times):
        while arrived - times[start] >= window_seconds:
            start += 1
        most = max(most, end - start + 1)
    return ArrivalStats(len(times), times[-1] - times[0], most)
