"""Gemini image generation through the official google-genai SDK, online or in batch mode.

Online (``mode: online``), one ``generateContent`` call per image, with
``responseModalities=["IMAGE"]``, the aspect ratio nearest to the requested size and the seed. The
calls run concurrently on a private event loop in a helper thread, paced by a token bucket, retried
with exponential backoff and full jitter on 408/429/5xx and timeouts (the SDK's own retries are off
so that every retry is counted and paced), and stopped early by a per-run budget or an exhausted
daily quota.

Every request ends in exactly one result: ``ok`` (an image), ``blocked`` (the model answered
without an image: a safety refusal, NO_IMAGE, text only, a blocked prompt; never a placeholder),
``failed`` (an error, with its text) or ``skipped_budget``.

Batch (``mode: batch``, per prompt set too): the same requests as JSONL lines submitted to the
Batch API at half the price; see ``batch`` and ``steps/gemini_batch.py``.

Negative prompts: Gemini has no negative-prompt parameter, and this backend does not fold one
into the prompt text ("Avoid: ..."). Google's prompting guide for image generation recommends
describing the wanted scene positively ("semantic negative prompts") because naming a concept,
even to exclude it, tends to put it in the picture; the per-style negatives of the template
enhancer ("text, watermark, blurry, ...") are tuned for diffusion models' classifier-free
guidance and would do exactly that here. ``supports_negative_prompt`` is therefore False, and
the pipeline records an empty negative prompt for Gemini images, which keeps their content
addresses honest.

The API key is never logged, printed or recorded: it is left out of reprs and redacted from
every error text, warning and metadata value this package produces.

The modules, one concern each (this package's ``__init__`` only declares the spec, so that
listing the backends never imports google-genai):

- ``settings``: :class:`GeminiSettings`, every knob of the backend;
- ``backend``: :class:`GeminiBackend`, the concurrent request loop and its run summary;
- ``content``: what a call sends (aspect ratio, seed) and what its answer means (image/blocked);
- ``errors``: what a failed call means (retry, give up, daily quota) and the backend's errors;
- ``pacing``: the token bucket and the retry backoff;
- ``pricing``: tokens and cost of an answer;
- ``prices``: the price table per model (one place, with its source and date);
- ``batch``: the Batch API calls and files (the batch step is ``steps/gemini_batch.py``).
"""

from imagegen_pipeline.backends.gemini.settings import GeminiSettings
from imagegen_pipeline.model_spec import ModelSpec

SPEC = ModelSpec(
    name="gemini",
    role="image",
    implementation="imagegen_pipeline.backends.gemini.backend:GeminiBackend",
    settings=GeminiSettings,
    default_model=GeminiSettings.model_fields["model"].default,
    key_env_var="GEMINI_API_KEY",
    runs_on="api",
    per_set_settings=(
        "mode",
        "model",
        "batch_max_requests",
        "batch_retry",
        "overflow_queue_limit_seconds",
    ),
)
