"""The offline enhancer: style phrases, quality modifiers and per-style negative prompts."""

from __future__ import annotations

from dataclasses import dataclass

from imagegen_pipeline.enhancement.base import Enhancement

STYLE_PHRASES = {
    "photorealistic": "photorealistic photograph, natural lighting, 50mm lens, sharp focus",
    "artistic": "detailed digital painting, expressive brushwork, rich colour palette",
    "cinematic": "cinematic film still, dramatic lighting, shallow depth of field, anamorphic",
    "anime": "anime illustration, clean line art, cel shading, vibrant colours",
    "none": "",
}
QUALITY_MODIFIERS = "highly detailed, balanced composition, high quality"
STYLE_NEGATIVES = {
    "photorealistic": "cartoon, illustration, painting, cgi, oversaturated",
    "artistic": "photograph, photorealistic, flat colours",
    "cinematic": "flat lighting, snapshot, amateur",
    "anime": "photorealistic, photograph, 3d render",
    "none": "",
}
COMMON_NEGATIVES = "blurry, low quality, jpeg artifacts, watermark, text, deformed"


def _join(*parts: str) -> str:
    return ", ".join(part.strip().strip(",") for part in parts if part and part.strip())


@dataclass
class TemplateEnhancer:
    """Deterministic, offline, instant: the default and the fallback of the LLM enhancers."""

    method: str = "template"
    model: str = ""

    def enhance(self, prompt: str, style: str, negative_prompt: str = "") -> Enhancement:
        """Append the style's phrases and the quality modifiers; merge the negative prompts."""
        text = _join(prompt, STYLE_PHRASES.get(style, ""), QUALITY_MODIFIERS)
        negative = _join(negative_prompt, STYLE_NEGATIVES.get(style, ""), COMMON_NEGATIVES)
        return Enhancement(
            text=text, negative_prompt=negative, method=self.method, model=self.model
        )
