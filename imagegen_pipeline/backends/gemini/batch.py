"""The Gemini Batch API, the calls and the files: what a batch step sends, polls and reads.

A batch is a JSONL file of ``{"key", "request"}`` lines (the key: the image's content address;
the request: the same ``generateContent`` body an online call sends), uploaded with the Files
API and submitted with ``client.batches.create``. ``client.batches.get`` reports its state
until ``JOB_STATE_SUCCEEDED`` / ``FAILED`` / ``CANCELLED`` / ``EXPIRED``; the results are a
JSONL file (``dest.file_name``) of ``{"key", "response"}`` lines, or ``{"key", "status"}`` for
a request that failed, downloaded with ``client.files.download`` to a temporary file and read one
line at a time, so a batch of large images never sits in memory whole. File input and output
only: inline batches of images are limited to 20 MB and users report inline results that were
billed but could not be fetched (503/504 on get).

Every call goes through google-genai with its own retries (``HttpRetryOptions``: 408, 429,
5xx), so a 503 on a get is retried; what still fails reaches the caller, who polls again later.
The step that writes the images, keeps the ledger of jobs and decides retries is
``steps/gemini_batch.py``; nothing here knows about storage.
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from google import genai
from google.genai import types

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.gemini.content import Answer, aspect_ratio_for, read_answer
from imagegen_pipeline.backends.gemini.errors import clip
from imagegen_pipeline.backends.gemini.pricing import enum_name
from imagegen_pipeline.backends.gemini.settings import GeminiSettings
from imagegen_pipeline.gemini_client import make_gemini_client, redact

FINAL_STATES = frozenset(
    {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}
)


def request_line(key: str, request: ImageRequest) -> dict[str, Any]:
    """One JSONL line: the image's key and the generateContent body of an online call
    (content.request_contents and image_call_config: the reference image if any, the prompt,
    image only, the nearest aspect ratio, the seed)."""
    parts: list[dict[str, Any]] = [{"text": request.prompt}]
    if request.control is not None:  # the row's reference image first, as online
        path = request.control.path
        data = base64.b64encode(path.read_bytes()).decode()
        mime_type = mimetypes.guess_type(path.name)[0] or "image/png"
        parts.insert(0, {"inlineData": {"mimeType": mime_type, "data": data}})
    return {
        "key": key,
        "request": {
            "contents": [{"role": "user", "parts": parts}],
            "generationConfig": {
                "responseModalities": ["IMAGE"],
                "imageConfig": {"aspectRatio": aspect_ratio_for(request.width, request.height)},
                "seed": request.seed,
            },
        },
    }


@dataclass(frozen=True)
class JobStatus:
    """What a get said about a job."""

    name: str
    state: str  # JOB_STATE_*
    result_file: str = ""
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class LineResult:
    """One line of a result file: its key and its answer, or why the request failed."""

    key: str
    answer: Answer | None
    error: str = ""


class BatchClient:
    """The Batch API calls of one step, through one google-genai client."""

    def __init__(self, settings: GeminiSettings) -> None:
        self.settings = settings
        self.client: genai.Client = make_gemini_client(
            settings.api_key or "",
            base_url=settings.base_url,
            timeout_seconds=settings.timeout_seconds,
            retry_options=types.HttpRetryOptions(
                attempts=settings.max_attempts,
                initial_delay=settings.initial_backoff_seconds,
                max_delay=settings.max_backoff_seconds,
            ),
        )

    def describe(self, error: BaseException) -> str:
        """An error as text for logs and rows, the key redacted."""
        return clip(redact(f"{type(error).__name__}: {error}", self.settings.api_key))

    def submit(self, display_name: str, lines: Sequence[dict[str, Any]]) -> tuple[str, str]:
        """Upload ``lines`` as a JSONL file and create a batch job on it: (job name, file)."""
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
        uploaded = self.client.files.upload(
            file=io.BytesIO(data),
            config=types.UploadFileConfig(mime_type="jsonl", display_name=display_name),
        )
        job = self.client.batches.create(
            model=self.settings.model,
            src=uploaded.name or "",
            config=types.CreateBatchJobConfig(display_name=display_name),
        )
        return job.name or "", uploaded.name or ""

    def find(self, display_name: str) -> str | None:
        """The job created under ``display_name``, if any (a run killed between creating a
        job and recording it)."""
        for job in self.client.batches.list(config=types.ListBatchJobsConfig(page_size=100)):
            if job.display_name == display_name and job.name:
                return job.name
        return None

    def status(self, name: str) -> JobStatus:
        """The job's state now (and its result file once it succeeded)."""
        job = self.client.batches.get(name=name)
        result_file = (job.dest.file_name or "") if job.dest else ""
        error = ""
        if job.error is not None:
            error = clip(f"{job.error.code}: {job.error.message}")
        return JobStatus(name, enum_name(job.state), result_file, error)

    def cancel(self, name: str) -> None:
        """Ask the service to cancel the job (the requests it already ran are billed)."""
        self.client.batches.cancel(name=name)

    def results(self, result_file: str) -> Iterator[LineResult]:
        """The lines of a result file, one at a time, from a temporary file on disk."""
        handle, path = tempfile.mkstemp(prefix="gemini-batch-", suffix=".jsonl")
        os.close(handle)
        try:
            self.client.files.download(file=result_file, destination=path)
            with open(path, encoding="utf-8") as lines:
                for line in lines:
                    if line.strip():
                        yield self.read_line(line)
        finally:
            os.unlink(path)

    def read_line(self, line: str) -> LineResult:
        """One result line: an answer (an image or blocked, priced at the batch price) or the
        failure its status names."""
        try:
            entry = json.loads(line)
        except ValueError as exc:
            return LineResult("", None, f"malformed result line: {exc}")
        key = str(entry.get("key", ""))
        status = entry.get("status") or entry.get("error")
        if status or "response" not in entry:
            status = status or {}
            text = f"batch request failed: {status.get('code', '?')} {status.get('message', '')}"
            return LineResult(key, None, clip(redact(text.strip(), self.settings.api_key)))
        try:
            response = types.GenerateContentResponse.model_validate(entry["response"])
        except ValueError as exc:
            return LineResult(key, None, f"malformed response in the result file: {exc}")
        return LineResult(key, read_answer(response, self.settings))

    def close(self) -> None:
        self.client.close()
