"""The images step of a Gemini partition in batch mode: submit, wait a little, collect.

``BatchImagesKind`` is the images output kind with another ``produce``: the images to make
become batch jobs of at most ``batch_max_requests`` requests (``backends/gemini/batch.py``),
each recorded in the ``batch_jobs`` run-metadata table *before* anything waits on it. A later
run of the partition (the same run restarted, a worker replaced, the collect sensor's run) reads
the open jobs there and polls them instead of submitting again: a job is paid for once.

While jobs are open the step logs their states, request counts and time waited every poll. A
job that succeeds has its result file read line by line; each image is handed to the writer
threads as soon as it is parsed (written atomically under its content address, like every
image). Refusals are ``blocked`` with their reason. Keys that failed (a failed line, a job that
failed or expired) go to a smaller follow-up batch, online, or nowhere (``batch_retry``); a
follow-up's failures are final. A job still open past ``batch_deadline_hours`` is cancelled
and its images recorded ``failed`` with the reason. After ``batch_wait_seconds`` the step
stops waiting: the images of jobs still open are recorded ``pending`` and the collect sensor
(``defs/images/batch_sensor.py``) starts a run of the partition when a job finishes.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from PIL import Image

from imagegen_pipeline.backends.base import ImageResult, RunSummary
from imagegen_pipeline.backends.gemini.batch import BatchClient, JobStatus, request_line
from imagegen_pipeline.records import EXISTING_STATUSES, BatchJobRecord, utc_now
from imagegen_pipeline.run_metadata import load_run_metadata, write_records
from imagegen_pipeline.steps.images import ImagesKind, PlannedImage
from imagegen_pipeline.storage import Storage

OPEN_STATUSES = ("submitting", "open")


def open_batch_jobs(
    storage: Storage, prompt_set: str | None = None, backend: str | None = None
) -> list[BatchJobRecord]:
    """The batch jobs not collected yet (of one partition, or all), from the run metadata."""
    rows = load_run_metadata(storage, "batch_jobs", prompt_set=prompt_set, backend=backend)
    rows = rows[rows["status"].isin(OPEN_STATUSES)] if len(rows) else rows
    records = []
    for row in rows.to_dict("records"):
        values = {k: (None if _missing(v) else v) for k, v in row.items()}
        records.append(BatchJobRecord(**values))  # type: ignore[arg-type]
    return records


def close_done_jobs(storage: Storage, jobs: list[BatchJobRecord]) -> list[BatchJobRecord]:
    """Close the jobs whose every image is already made (a run killed after writing them and
    before recording the job collected; images made online since); returns the others."""
    still_open = []
    done: dict[tuple[str, str], set[str]] = {}
    for job in jobs:
        where = (job.prompt_set, job.backend)
        if where not in done:
            rows = load_run_metadata(
                storage,
                "images",
                prompt_set=job.prompt_set,
                backend=job.backend,
                columns=["image_id", "status"],
            )
            made = rows[rows["status"].isin(EXISTING_STATUSES)] if len(rows) else rows
            done[where] = set(made["image_id"]) if len(made) else set()
        keys = json.loads(job.keys or "[]")
        if job.status == "open" and keys and all(key in done[where] for key in keys):
            note = "every image of the job was already made"
            closed = replace(job, status="collected", error=note, row_id=None, recorded_at=None)
            write_records(
                storage,
                "batch_jobs",
                [closed],
                run_id=job.run_id,
                prompt_set=job.prompt_set,
                backend=job.backend,
            )
        else:
            still_open.append(job)
    return still_open


def _missing(value: Any) -> bool:
    try:
        return bool(value != value) or value is None  # NaN / NaT / None
    except (TypeError, ValueError):
        return False


def display_name(run_id: str, prompt_set: str, backend: str, keys: list[str], attempt: int) -> str:
    """A job's name of our own, recorded before the job is created: a run killed between
    creating a job and recording it is followed by one that finds the job by this name
    instead of paying again. The run id keeps a later submission of the same keys apart."""
    key = f"{run_id}|{prompt_set}|{backend}|{attempt}|{','.join(keys)}"
    return f"imagegen-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


@dataclass
class _Job:
    record: BatchJobRecord
    keys: list[str]


@dataclass
class BatchImagesKind(ImagesKind):
    """Images through the Gemini Batch API (see the module docstring)."""

    sleep: Any = time.sleep  # the poll timer; a test may pass another

    def run_summary(self) -> RunSummary:
        # No generate call of the backend: the job rows record what the batches did.
        return RunSummary()

    # --- the ledger ---

    def _write(self, record: BatchJobRecord) -> BatchJobRecord:
        """Record one state of a job (a new row: the last one is the job's current row)."""
        record = replace(record, run_id=self.step.run_id, row_id=None, recorded_at=None)
        write_records(
            self.step.storage,
            "batch_jobs",
            [record],
            run_id=self.step.run_id,
            prompt_set=self.step.prompt_set,
            backend=self.target.settings.backend,
        )
        return record

    # --- produce ---

    def produce(self, items: list[PlannedImage]) -> Iterator[tuple[PlannedImage, ImageResult]]:
        backend = self.backend()
        settings = backend.config  # checked: key present, prices known
        client = BatchClient(settings)
        by_key = {item.image_id: item for item in items}
        try:
            jobs = self._resume(client, by_key)
            covered = {key for job in jobs for key in job.keys}
            todo = [item for item in items if item.image_id not in covered]
            todo, over_budget = self._within_budget(todo, len(covered), settings)
            for item in over_budget:
                yield item, ImageResult(item.request, "skipped_budget", error=self._budget_note)
            size = settings.batch_max_requests
            for start in range(0, len(todo), size):
                jobs.append(self._submit(client, todo[start : start + size], attempt=0))
            yield from self._watch(client, jobs, by_key)
        finally:
            client.close()

    _budget_note = "budget reached: not submitted"

    def _within_budget(
        self, todo: list[PlannedImage], committed: int, settings: Any
    ) -> tuple[list[PlannedImage], list[PlannedImage]]:
        """The images the budget leaves room for (at the batch price), and the rest."""
        if settings.budget_usd is None:
            return todo, []
        each = settings.expected_image_usd()
        room = max(0, int((settings.budget_usd + 1e-12) / each) - committed) if each else len(todo)
        if room < len(todo):
            self._budget_note = (
                f"budget reached: ${settings.budget_usd:.4f} per run, ${each:.4f} per batch "
                "image; not submitted"
            )
        return todo[:room], todo[room:]

    def _resume(self, client: BatchClient, by_key: dict[str, PlannedImage]) -> list[_Job]:
        """The partition's open jobs that hold images still to make; a job whose creation was
        not recorded is looked up by its display name."""
        jobs = []
        records = open_batch_jobs(
            self.step.storage, self.step.prompt_set, self.target.settings.backend
        )
        for record in records:
            keys = json.loads(record.keys or "[]")
            if not any(key in by_key for key in keys):
                continue  # every image already written: nothing to wait for
            if record.status == "submitting":
                found = client.find(record.display_name)
                if found is None:  # never created: its images are submitted again below
                    error = "the run submitting it was stopped before the job was created"
                    self._write(replace(record, status="failed", error=error))
                    continue
                record = self._write(replace(record, status="open", job_name=found))
                self.log(f"Found batch job {found}, created but not recorded by a killed run.")
            else:
                self.log(f"Resuming batch job {record.job_name} ({len(keys)} requests).")
            jobs.append(_Job(record, keys))
        return jobs

    def _submit(self, client: BatchClient, items: list[PlannedImage], attempt: int) -> _Job:
        """Record the intent, create the job, record it: all before anyone waits on it."""
        settings = self.backend().config
        keys = [item.image_id for item in items]
        now = utc_now()
        record = self._write(
            BatchJobRecord(
                run_id=self.step.run_id,
                prompt_set=self.step.prompt_set,
                backend=self.target.settings.backend,
                display_name=display_name(
                    self.step.run_id,
                    self.step.prompt_set,
                    self.target.settings.backend,
                    keys,
                    attempt,
                ),
                status="submitting",
                model_id=self.target.settings.model_id,
                attempt=attempt,
                requests=len(keys),
                keys=json.dumps(keys),
                created_at=now,
                deadline_at=now + timedelta(hours=settings.batch_deadline_hours),
            )
        )
        lines = [request_line(item.image_id, item.request) for item in items]
        name, input_file = client.submit(record.display_name, lines)
        record = self._write(replace(record, status="open", job_name=name, input_file=input_file))
        self.log(f"Submitted batch job {name}: {len(keys)} request(s), attempt {attempt}.")
        return _Job(record, keys)

    # --- waiting and collecting ---

    def _watch(
        self, client: BatchClient, jobs: list[_Job], by_key: dict[str, PlannedImage]
    ) -> Iterator[tuple[PlannedImage, ImageResult]]:
        settings = self.backend().config
        started = time.monotonic()
        open_jobs = list(jobs)
        while open_jobs:
            still_open = []
            for job in open_jobs:
                try:
                    status = client.status(job.record.job_name)
                except Exception as error:  # a 5xx after the SDK's retries: look again later
                    self.log(f"Batch job {job.record.job_name}: {client.describe(error)}")
                    still_open.append(job)
                    continue
                if status.finished:
                    follow_up = yield from self._finish(client, job, status, by_key)
                    if follow_up is not None:
                        still_open.append(follow_up)
                elif utc_now() >= (job.record.deadline_at or utc_now()):
                    yield from self._cancel(client, job, status, by_key)
                else:
                    job.record.state = status.state
                    still_open.append(job)
            open_jobs = still_open
            waited = time.monotonic() - started
            if open_jobs:
                by_state = Counter(job.record.state or "JOB_STATE_PENDING" for job in open_jobs)
                states = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items()))
                requests = sum(len(job.keys) for job in open_jobs)
                self.log(
                    f"Gemini batch: {len(open_jobs)} job(s) open after {waited:.0f} s, "
                    f"{requests} requests: {states} "
                    f"({', '.join(job.record.job_name for job in open_jobs[:5])}"
                    f"{', ...' if len(open_jobs) > 5 else ''})"
                )
                if waited >= settings.batch_wait_seconds:
                    break
                self.sleep(settings.batch_poll_seconds)
        for job in open_jobs:  # left to a later run: the collect sensor starts it
            note = (
                f"pending in batch job {job.record.job_name} ({job.record.state}); "
                "a later run collects it"
            )
            for key in job.keys:
                if key in by_key:
                    yield by_key[key], ImageResult(by_key[key].request, "pending", error=note)

    def _cancel(
        self, client: BatchClient, job: _Job, status: JobStatus, by_key: dict[str, PlannedImage]
    ) -> Iterator[tuple[PlannedImage, ImageResult]]:
        hours = self.backend().config.batch_deadline_hours
        error = f"batch job {job.record.job_name} still {status.state} after {hours:g} h: cancelled"
        try:
            client.cancel(job.record.job_name)
        except Exception as exc:  # recorded: the job is abandoned either way
            error += f" (the cancel call failed: {client.describe(exc)})"
        self.log(error)
        self._write(
            replace(
                job.record,
                status="cancelled",
                state=status.state,
                error=error,
                failed=len(job.keys),
                finished_at=utc_now(),
            )
        )
        for key in job.keys:
            if key in by_key:
                yield by_key[key], ImageResult(by_key[key].request, "failed", error=error)

    def _finish(
        self, client: BatchClient, job: _Job, status: JobStatus, by_key: dict[str, PlannedImage]
    ) -> Iterator[tuple[PlannedImage, ImageResult]]:
        """Collect a finished job; returns the follow-up job of its failed keys, if any."""
        record = job.record
        failures: dict[str, str] = {}
        counts = {"ok": 0, "blocked": 0, "failed": 0}
        cost = 0.0
        if status.state == "JOB_STATE_SUCCEEDED" and status.result_file:
            seen: set[str] = set()
            for line in client.results(status.result_file):
                seen.add(line.key)
                if line.answer is None:
                    failures[line.key] = line.error
                    continue
                cost += line.answer.details.get("cost_usd") or 0.0
                counts[line.answer.status] += 1
                if line.key in by_key:
                    yield by_key[line.key], self._result(by_key[line.key], line.answer, record)
            for key in job.keys:
                if key not in seen:
                    failures[key] = f"no result line for this key in {status.result_file}"
        else:
            reason = status.error or "no result file"
            failures = {
                key: f"batch job {record.job_name} {status.state}: {reason}" for key in job.keys
            }
        counts["failed"] = len(failures)
        final = "collected" if status.state == "JOB_STATE_SUCCEEDED" else "failed"
        if status.state == "JOB_STATE_CANCELLED":
            final = "cancelled"
        self._write(
            replace(
                record,
                status=final,
                state=status.state,
                result_file=status.result_file,
                cost_usd=cost,
                finished_at=utc_now(),
                **counts,
            )
        )
        self.log(
            f"Batch job {record.job_name} {status.state}: {counts['ok']} ok, "
            f"{counts['blocked']} blocked, {len(failures)} failed, ${cost:.4f}."
        )
        retry = {key: error for key, error in failures.items() if key in by_key}
        follow_up = yield from self._retry(client, record, retry, by_key, status.state)
        return follow_up

    def _retry(
        self,
        client: BatchClient,
        record: BatchJobRecord,
        failures: dict[str, str],
        by_key: dict[str, PlannedImage],
        state: str,
    ) -> Iterator[tuple[PlannedImage, ImageResult]]:
        how = self.backend().config.batch_retry
        if not failures:
            return None
        items = [by_key[key] for key in failures]
        final = how == "none" or state == "JOB_STATE_CANCELLED"
        if how == "batch" and record.attempt == 0 and not final:
            self.log(f"{len(items)} failed request(s) of {record.job_name}: a follow-up batch.")
            return self._submit(client, items, attempt=1)
        if how == "online" and not final:
            self.log(f"{len(items)} failed request(s) of {record.job_name}: retried online.")
            yield from self._online(items)
            return None
        for item in items:
            yield item, ImageResult(item.request, "failed", error=failures[item.image_id])
        return None

    def _online(self, items: list[PlannedImage]) -> Iterator[tuple[PlannedImage, ImageResult]]:
        from imagegen_pipeline.backends.gemini.backend import GeminiBackend

        online = GeminiBackend(self.backend().config.model_copy(update={"mode": "online"}))
        by_request = {item.key: item for item in items}
        for result in online.generate([item.request for item in items]):
            yield by_request[(result.request.prompt_id, result.request.image_index)], result

    def _result(self, item: PlannedImage, answer: Any, record: BatchJobRecord) -> ImageResult:
        details = {**answer.details, "retries": record.attempt, "started_at": record.created_at}
        if answer.image_bytes is None:
            return ImageResult(item.request, "blocked", error=answer.error, details=details)
        try:
            image = Image.open(io.BytesIO(answer.image_bytes))
            image.load()
        except Exception as exc:  # any undecodable payload fails the image
            error = f"the batch result's image could not be decoded: {type(exc).__name__}: {exc}"
            return ImageResult(item.request, "failed", error=error, details=details)
        return ImageResult(item.request, "ok", image=image, details=details)
