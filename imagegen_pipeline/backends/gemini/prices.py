"""The price of every Gemini image model this project knows, in one table, with its source.

Source: Google's Gemini Developer API pricing page, https://ai.google.dev/gemini-api/docs/pricing,
paid tier, list prices as read on 2026-03-24 (``PRICES_AS_OF``). Prices change: when Google
changes them, change this table (and its date) and nothing else. A model missing from the table
runs only when every price is set on the ``gemini`` resource (``price_per_*``); otherwise it is
refused when the step starts, before any request is sent.

Image models bill their output per token; one image up to 1024x1024 (1K; 2K for the Pro model)
is a fixed number of output tokens, which gives the per-image price the budget reserves. Batch
mode bills every token at half the online price (``BATCH_DISCOUNT``).
"""

from __future__ import annotations

from dataclasses import dataclass

PRICES_SOURCE = "https://ai.google.dev/gemini-api/docs/pricing (paid tier)"
PRICES_AS_OF = "2026-03-24"
BATCH_DISCOUNT = 0.5  # "50% of the standard cost" (Gemini API docs, Batch API)


@dataclass(frozen=True)
class ModelPrice:
    """USD per token of one model, online; and the output tokens of one image."""

    input_per_token: float
    image_output_per_token: float
    text_output_per_token: float  # text and thinking tokens of the answer
    tokens_per_image: int  # output tokens of one image at the default size

    @property
    def per_image(self) -> float:
        """The output price of one image at the default size, online."""
        return self.tokens_per_image * self.image_output_per_token


MODEL_PRICES: dict[str, ModelPrice] = {
    # Nano Banana: $30 per 1M image tokens, 1290 tokens an image = $0.039. Legacy since the 3.x
    # image models, still served; the default so that existing images keep their addresses.
    "gemini-2.5-flash-image": ModelPrice(0.30e-6, 30.0e-6, 2.50e-6, 1290),
    "gemini-2.5-flash-image-preview": ModelPrice(0.30e-6, 30.0e-6, 2.50e-6, 1290),  # its preview
    # Nano Banana 2: $60 per 1M image tokens, 1120 tokens a 1K image = $0.067.
    "gemini-3.1-flash-image-preview": ModelPrice(0.50e-6, 60.0e-6, 3.00e-6, 1120),
    # Nano Banana Pro: $120 per 1M image tokens, 1120 tokens a 1K or 2K image = $0.134.
    "gemini-3-pro-image-preview": ModelPrice(2.00e-6, 120.0e-6, 12.00e-6, 1120),
}


class UnknownModelPriceError(ValueError):
    """A model without a price in the table and without every price set explicitly."""


def model_price(
    model: str,
    *,
    input_per_token: float | None = None,
    image_output_per_token: float | None = None,
    text_output_per_token: float | None = None,
    tokens_per_image: int | None = None,
) -> ModelPrice:
    """The price of ``model``: the table's, with any explicit price put over it; a model not in
    the table needs all four explicit values."""
    explicit = {
        "input_per_token": input_per_token,
        "image_output_per_token": image_output_per_token,
        "text_output_per_token": text_output_per_token,
        "tokens_per_image": tokens_per_image,
    }
    known = MODEL_PRICES.get(model.removeprefix("models/"))
    if known is None:
        missing = [name for name, value in explicit.items() if value is None]
        if missing:
            settings = {
                "input_per_token": "price_per_input_token_usd",
                "image_output_per_token": "price_per_output_token_usd",
                "text_output_per_token": "price_per_output_text_token_usd",
                "tokens_per_image": "tokens_per_image",
            }
            raise UnknownModelPriceError(
                f"no price known for Gemini model {model!r} (the table in "
                f"backends/gemini/prices.py, {PRICES_SOURCE} as of {PRICES_AS_OF}, has "
                f"{', '.join(MODEL_PRICES)}): set "
                f"{', '.join(settings[name] for name in missing)} on the gemini resource; "
                "no request was sent"
            )
        return ModelPrice(**explicit)  # type: ignore[arg-type]
    chosen = {name: value for name, value in explicit.items() if value is not None}
    return ModelPrice(**{**known.__dict__, **chosen})
