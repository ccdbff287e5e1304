"""The loopback Gemini server with the Files upload and the Batch API, in the documented shapes.

:class:`FakeGeminiBatch` is :class:`FakeGemini` (``generateContent``) plus:

- ``POST /upload/v1beta/files`` (resumable upload: ``start`` answers an ``x-goog-upload-url``;
  ``upload, finalize`` on it stores the bytes and answers ``{"file": {...}}``);
- ``POST /v1beta/models/{model}:batchGenerateContent`` with ``batch.inputConfig.fileName``:
  a long-running operation ``{"name": "batches/..", "metadata": {.., "state": ..}}``;
- ``GET /v1beta/batches/{id}``: the state moves on a timer, PENDING -> RUNNING -> a final
  state (SUCCEEDED unless ``outcomes`` scripts FAILED or EXPIRED), with ``batchStats`` and,
  once succeeded, ``output.responsesFile``; ``get_faults`` injects a 503 on a get;
- ``POST /v1beta/batches/{id}:cancel`` and ``GET /v1beta/batches`` (list);
- ``GET /v1beta/files/{id}:download?alt=media``: the result JSONL, one line per request key,
  ``{"key", "response"}`` or ``{"key", "status"}`` (a google.rpc.Status) for a failed request.

Each request line is answered like an online call for the same prompt (``script`` faults
apply per line: ``server_error`` becomes a status line, ``image_safety`` a blocked answer).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from tests.support.fake_servers import (
    FakeGemini,
    RecordedRequest,
    _json,
    google_error,
)

STATUS_FAULTS = {  # a request line's fault -> the google.rpc.Status of its failed line
    "server_error": (13, "INTERNAL", "An internal error has occurred."),
    "unavailable": (14, "UNAVAILABLE", "The model is overloaded."),
    "rate_limit": (8, "RESOURCE_EXHAUSTED", "Quota exceeded."),
}


@dataclass
class FakeBatchJob:
    """One batch job the server holds."""

    name: str
    model: str
    display_name: str
    input_file: str
    created: float  # time.monotonic()
    created_at: str  # RFC 3339
    requests: int
    outcome: str = "SUCCEEDED"  # its final state once the timer runs out
    state_override: str = ""  # CANCELLED after a cancel
    result_file: str = ""
    gets: int = 0


@dataclass
class _Upload:
    display_name: str
    mime_type: str
    size: int
    data: bytes = b""


def _header(record: RecordedRequest, name: str) -> str:
    for key, value in record.headers.items():
        if key.lower() == name.lower():
            return value
    return ""


class FakeGeminiBatch(FakeGemini):
    """:class:`FakeGemini` plus Files upload/download and the batch endpoints."""

    def __init__(
        self, *, pending_seconds: float = 0.1, running_seconds: float = 0.2, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.pending_seconds = pending_seconds
        self.running_seconds = running_seconds
        self.jobs: dict[str, FakeBatchJob] = {}
        self.files: dict[str, bytes] = {}
        self.outcomes: list[str] = []  # final states of the next jobs created (then SUCCEEDED)
        self.get_faults: list[str] = []  # "unavailable": the next gets answer 503
        self._uploads: dict[str, _Upload] = {}
        self._ids = 0

    # --- test helpers ---

    @property
    def batch_creates(self) -> int:
        """How many batch jobs were created (what was paid for)."""
        return len(self.jobs)

    def requests_in(self, job_name: str) -> list[dict[str, Any]]:
        """The request lines of a job's input file."""
        job = self.jobs[job_name]
        return [json.loads(line) for line in self.files[job.input_file].splitlines() if line]

    # --- routing ---

    def respond(self, record: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        path = urlparse(record.path).path
        if path == "/upload/v1beta/files" and record.method == "POST":
            return self._upload(record)
        if path.endswith(":batchGenerateContent") and record.method == "POST":
            return self._create(record, path)
        if path == "/v1beta/batches" and record.method == "GET":
            with self._lock:
                jobs = list(self.jobs.values())
            return _json(200, {"operations": [self._operation(job) for job in jobs]})
        if path.startswith("/v1beta/batches/"):
            name = path.removeprefix("/v1beta/")
            if name.endswith(":cancel") and record.method == "POST":
                return self._cancel(name.removesuffix(":cancel"))
            return self._get(name)
        if path.startswith("/v1beta/files/") and path.endswith(":download"):
            file_name = path.removeprefix("/v1beta/").removesuffix(":download")
            data = self.files.get(file_name)
            if data is None:
                return _json(404, google_error(404, "NOT_FOUND", f"no file {file_name}"))
            return 200, {"Content-Type": "application/octet-stream"}, data
        return super().respond(record)

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}{self._ids:04d}"

    # --- files ---

    def _upload(self, record: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        command = _header(record, "X-Goog-Upload-Command")
        if "start" in command:
            meta = (record.body or {}).get("file", {}) if isinstance(record.body, dict) else {}
            upload_id = self._new_id("u")
            self._uploads[upload_id] = _Upload(
                meta.get("displayName", ""),
                meta.get("mimeType", ""),
                int(_header(record, "X-Goog-Upload-Header-Content-Length") or 0),
            )
            url = f"{self.url}/upload/v1beta/files?upload_id={upload_id}"
            return _json(200, {}, {"x-goog-upload-url": url, "X-Goog-Upload-Status": "active"})
        upload_id = record.path.rpartition("upload_id=")[2]
        upload = self._uploads.get(upload_id)
        if upload is None:
            return _json(404, google_error(404, "NOT_FOUND", "no such upload"))
        body = record.body
        chunk = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        upload.data += chunk
        if "finalize" not in command:
            return _json(200, {}, {"X-Goog-Upload-Status": "active"})
        name = self._new_id("files/in-")
        self.files[name] = upload.data
        file = {
            "name": name,
            "displayName": upload.display_name,
            "mimeType": upload.mime_type or "application/jsonl",
            "sizeBytes": str(len(upload.data)),
            "state": "ACTIVE",
            "uri": f"{self.url}/v1beta/{name}",
            "source": "UPLOADED",
        }
        return _json(200, {"file": file}, {"X-Goog-Upload-Status": "final"})

    # --- batches ---

    def _create(self, record: RecordedRequest, path: str) -> tuple[int, dict[str, str], bytes]:
        batch = (record.body or {}).get("batch", {}) if isinstance(record.body, dict) else {}
        input_file = (batch.get("inputConfig") or {}).get("fileName", "")
        if input_file not in self.files:
            return _json(400, google_error(400, "INVALID_ARGUMENT", f"no file {input_file!r}"))
        lines = [line for line in self.files[input_file].splitlines() if line.strip()]
        model = path.removeprefix("/v1beta/models/").removesuffix(":batchGenerateContent")
        with self._lock:
            outcome = self.outcomes.pop(0) if self.outcomes else "SUCCEEDED"
        job = FakeBatchJob(
            name=self._new_id("batches/job-"),
            model=model,
            display_name=batch.get("displayName", ""),
            input_file=input_file,
            created=time.monotonic(),
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            requests=len(lines),
            outcome=outcome,
        )
        self.jobs[job.name] = job
        return _json(200, self._operation(job))

    def _state(self, job: FakeBatchJob) -> str:
        if job.state_override:
            return job.state_override
        age = time.monotonic() - job.created
        if age < self.pending_seconds:
            return "PENDING"
        if age < self.pending_seconds + self.running_seconds:
            return "RUNNING"
        return job.outcome

    def _operation(self, job: FakeBatchJob) -> dict[str, Any]:
        state = self._state(job)
        done = state not in ("PENDING", "RUNNING")
        if state == "SUCCEEDED" and not job.result_file:
            job.result_file = self._results(job)
        finished = job.requests if state == "SUCCEEDED" else 0
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
            "name": job.name,
            "model": f"models/{job.model}",
            "displayName": job.display_name,
            "inputConfig": {"fileName": job.input_file},
            "createTime": job.created_at,
            "updateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "batchStats": {
                "requestCount": str(job.requests),
                "successfulRequestCount": str(finished),
                "pendingRequestCount": str(job.requests - finished),
            },
            "state": f"BATCH_STATE_{state}",
        }
        if state == "SUCCEEDED":
            metadata["output"] = {"responsesFile": job.result_file}
        operation: dict[str, Any] = {"name": job.name, "metadata": metadata, "done": done}
        if state == "FAILED":
            operation["error"] = {"code": 13, "message": "The batch failed."}
        return operation

    def _get(self, name: str) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            fault = self.get_faults.pop(0) if self.get_faults else ""
        if fault == "unavailable":
            return _json(503, google_error(503, "UNAVAILABLE", "The service is unavailable."))
        job = self.jobs.get(name)
        if job is None:
            return _json(404, google_error(404, "NOT_FOUND", f"no batch {name}"))
        job.gets += 1
        return _json(200, self._operation(job))

    def _cancel(self, name: str) -> tuple[int, dict[str, str], bytes]:
        job = self.jobs.get(name)
        if job is None:
            return _json(404, google_error(404, "NOT_FOUND", f"no batch {name}"))
        if self._state(job) in ("PENDING", "RUNNING"):
            job.state_override = "CANCELLED"
        return _json(200, {})

    def _results(self, job: FakeBatchJob) -> str:
        """Answer every request line of the job as the online endpoint would; store the file."""
        out = []
        for line in self.files[job.input_file].splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            body = entry.get("request", {})
            request = RecordedRequest("POST", "", {}, body, time.monotonic())
            fault = self._next_fault(request.prompt)
            if fault in STATUS_FAULTS:
                code, status, message = STATUS_FAULTS[fault]
                status_body = {"code": code, "message": message, "status": status}
                out.append({"key": entry.get("key"), "status": status_body})
                continue
            answer = self._image_answer(request, job.model, fault)
            out.append({"key": entry.get("key"), "response": answer})
        name = self._new_id("files/batch-results-")
        self.files[name] = "".join(json.dumps(row) + "\n" for row in out).encode()
        return name
