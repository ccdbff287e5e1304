"""What one image call sends, and what its answer means.

The request: the prompt (after the row's control image as a reference image, when the row has
one: Gemini takes no ControlNet but composes from an image it is given),
``responseModalities=["IMAGE"]``, the supported aspect ratio nearest to the requested size
(Gemini takes a ratio, not pixels) and the seed.

The answer: an image, or no image. Any answer without an image is *blocked*, whatever the cause
(a safety refusal, NO_IMAGE, a text-only reply, a blocked prompt): the reason and whatever the
model said go into the error text, and no placeholder image is ever made.
"""

from __future__ import annotations

import math
import mimetypes
from dataclasses import dataclass, field
from typing import Any

from google.genai import types

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.gemini.errors import clip
from imagegen_pipeline.backends.gemini.pricing import enum_name, usage_cost
from imagegen_pipeline.backends.gemini.settings import GeminiSettings
from imagegen_pipeline.gemini_client import redact

# Aspect ratios gemini-2.5-flash-image accepts in imageConfig.aspectRatio.
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
# Finish reasons of a candidate that holds no image because the model would or could not draw.
NO_IMAGE_FINISH_REASONS = frozenset(
    {"IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "NO_IMAGE", "PROHIBITED_CONTENT", "SAFETY"}
)


def aspect_ratio_for(width: int, height: int) -> str:
    """The supported aspect ratio nearest to ``width`` x ``height`` (compared on a log scale)."""
    wanted = math.log(width / height)

    def distance(ratio: str) -> float:
        w, h = ratio.split(":")
        return abs(math.log(int(w) / int(h)) - wanted)

    return min(ASPECT_RATIOS, key=distance)


def request_contents(request: ImageRequest) -> str | list[types.Part]:
    """The contents of the call for ``request``: its prompt, after its reference image."""
    if request.control is None:
        return request.prompt
    path = request.control.path
    mime_type = mimetypes.guess_type(path.name)[0] or "image/png"
    return [
        types.Part.from_bytes(data=path.read_bytes(), mime_type=mime_type),
        types.Part.from_text(text=request.prompt),
    ]


def image_call_config(request: ImageRequest) -> types.GenerateContentConfig:
    """The generation config of the call for ``request``: image only, its ratio and seed."""
    return types.GenerateContentConfig(
        response_modalities=["IMAGE"],
        image_config=types.ImageConfig(
            aspect_ratio=aspect_ratio_for(request.width, request.height)
        ),
        seed=request.seed,
        # No tools are sent; disabling AFC also drops the SDK's INFO line on every call.
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )


@dataclass
class Answer:
    """What an answer held: the image's bytes (None when blocked), why not, and its facts."""

    image_bytes: bytes | None
    error: str = ""
    # prompt_tokens, output_tokens, cost_usd, finish_reason: for the image's metadata row.
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``ok`` with an image, ``blocked`` without."""
        return "ok" if self.image_bytes is not None else "blocked"


def read_answer(response: types.GenerateContentResponse, settings: GeminiSettings) -> Answer:
    """The image of an answer, or the reason it has none; tokens and cost either way."""
    prompt_tokens, output_tokens, cost = usage_cost(response.usage_metadata, settings)
    feedback = response.prompt_feedback
    block_reason = enum_name(feedback.block_reason) if feedback else ""
    candidate = (response.candidates or [None])[0]
    finish_reason = enum_name(candidate.finish_reason) if candidate else ""
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
    details = {
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "cost_usd": cost,
        "finish_reason": finish_reason or block_reason,
    }
    if image_bytes is not None and not block_reason:
        if cost is None:  # no usage metadata: charge the expected price of an image
            details["cost_usd"] = settings.expected_image_usd()
        return Answer(image_bytes, details=details)
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
    details["cost_usd"] = cost or 0.0
    return Answer(None, clip(redact(error, settings.api_key)), details)
