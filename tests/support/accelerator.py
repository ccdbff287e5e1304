"""Accelerator stand-ins for benchmarks: what the pipeline would see next to an H100, on a CPU.

The images and quality steps must keep a fast accelerator busy: encoding, hashing and writing
PNGs (or decoding and measuring them) has to keep up with the model. This machine has no GPU, so
these stand-ins take the model's place. Each one sleeps for the device time of a batch, taken
from published per-image figures. ``time.sleep`` releases the GIL as a CUDA synchronise does.
Each returns what the real model returns, so the real step code runs around it unchanged:

- :class:`AcceleratorStandIn` is an :class:`ImageBackend` that yields photographic images at the
  requested size (:class:`PhotoSource`). PNG cost depends on content: noise or flat colour would
  make encoding unrealistically slow or fast.
- :class:`ScorerStandIn` is a :class:`ClipModel` with ViT-L-14's real open_clip preprocessing.
  It sleeps at ViT-L-14's published rate instead of running the image tower. Its scores come
  from cheap stand-in embeddings through the real ``score_pixels``, so the report has every
  real column.

Benchmarks only: neither is in the registry, so no prompt CSV, partition or resource can select
one. Nothing in the pipeline imports this module.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from imagegen_pipeline.backends.base import ImageBackend, ImageRequest, ImageResult, RunSummary
from imagegen_pipeline.model_settings import GenerationSettings
from imagegen_pipeline.records import utc_now
from imagegen_pipeline.registry import MODELS
from imagegen_pipeline.scoring.clip_model import ASPECTS, ClipModel, ClipModelSettings

# Published per-image device times on one H100, as (side in px, seconds per image): SDXL-Turbo
# makes a 512 px image in about 28 ms (35 images/s); FLUX.1-schnell a 1024 px image in about
# 0.5 s when optimised.
DEVICE_SECONDS_PER_IMAGE: dict[str, tuple[int, float]] = {
    "sdxl_turbo": (512, 0.028),
    "flux_schnell": (1024, 0.5),
}
# The published rate of the ViT-L-14 image tower on the same GPU.
VIT_L_14_IMAGES_PER_SECOND = 312.0

GRAIN_SIGMA = 2.0  # grey levels of sensor-like noise: real outputs are not smooth upscales
POOL_SIZE = 8  # distinct photos per size; every request still gets distinct bytes
TAG_BITS = 32  # pixels of the top row whose lowest red bit carries a request's tag
STAND_IN_DEVICE = "accelerator-stand-in"  # the device recorded in the run metadata


def _sample_photo() -> Image.Image:
    """Grace Hopper's portrait (512x600 JPEG), shipped with matplotlib: a real photo, offline."""
    import matplotlib.cbook

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(path) as photo:
        return photo.convert("RGB")


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class PhotoSource:
    """Photographic test images of any size, offline, cheap to hand out.

    The photos of a size are made once, the first time that size is asked for. Each is a
    random crop of the sample photo, sometimes mirrored, with a slight colour cast, resized to
    the size, plus seeded Gaussian grain. Without the grain, an upscale to 1024 px would
    compress far better than a real model's output. Handing one out costs a copy. Its top-row
    marks make each request's pixels distinct, as a real model's are, and never show.
    """

    def __init__(
        self, pool_size: int = POOL_SIZE, seed: int = 0, grain_sigma: float = GRAIN_SIGMA
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.pool_size = pool_size
        self.seed = seed
        self.grain_sigma = grain_sigma
        self._source: Image.Image | None = None
        self._pools: dict[tuple[int, int], list[Image.Image]] = {}
        self._lock = threading.Lock()

    def pool(self, width: int, height: int) -> list[Image.Image]:
        """The distinct photos of one size (made on the first call for that size)."""
        with self._lock:
            if (width, height) not in self._pools:
                if self._source is None:
                    self._source = _sample_photo()
                self._pools[width, height] = [
                    self._make(width, height, index) for index in range(self.pool_size)
                ]
            return self._pools[width, height]

    def _make(self, width: int, height: int, index: int) -> Image.Image:
        assert self._source is not None
        rng = np.random.default_rng([self.seed, width, height, index])
        source_width, source_height = self._source.size
        aspect = width / height
        crop_width = min(source_width, source_height * aspect) * rng.uniform(0.6, 1.0)
        crop_height = crop_width / aspect
        left = rng.uniform(0, source_width - crop_width)
        top = rng.uniform(0, source_height - crop_height)
        image = self._source.resize(
            (width, height),
            Image.Resampling.BICUBIC,
            box=(left, top, left + crop_width, top + crop_height),
        )
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.float32)
        pixels *= rng.uniform(0.92, 1.08, 3).astype(np.float32)  # a slight colour cast
        pixels += rng.uniform(-8, 8)  # and exposure
        pixels += self.grain_sigma * rng.standard_normal(pixels.shape, dtype=np.float32)
        return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))

    def photo(self, width: int, height: int, key: str) -> Image.Image:
        """A new image for ``key`` (a request): the same key always gets the same pixels."""
        digest = _digest(key)
        image = self.pool(width, height)[digest % self.pool_size].copy()
        tag = digest >> (64 - TAG_BITS)
        pixels = image.load()
        assert pixels is not None
        for x in range(min(TAG_BITS, width)):
            red, green, blue = pixels[x, 0]  # type: ignore[misc]
            pixels[x, 0] = ((red & 0xFE) | (tag >> x & 1), green, blue)
        return image

    def nbytes(self) -> int:
        """Memory the photos made so far hold."""
        with self._lock:
            images = [image for pool in self._pools.values() for image in pool]
        return sum(len(image.getbands()) * image.width * image.height for image in images)


def enhanced_prompts(
    count: int,
    backends: Sequence[str],
    *,
    images_each: int = 1,
    width: int | None = None,
    height: int | None = None,
) -> pd.DataFrame:
    """An ``enhanced_prompts`` table of ``count`` prompts: the columns ``plan_images`` reads.

    Sizes left at None are the backend's default size, as for a CSV row without one.
    """
    return pd.DataFrame(
        {
            "prompt_id": [f"p{index:05d}" for index in range(count)],
            "enhanced_prompt": [
                f"a lighthouse on a cliff at dusk, variation {index}, photorealistic photograph, "
                "natural lighting, 50mm lens, sharp focus, highly detailed, high quality"
                for index in range(count)
            ],
            "negative_prompt": ["blurry, low quality, watermark"] * count,
            "seed": pd.array([None] * count, dtype="Int64"),
            "width": pd.array([width] * count, dtype="Int64"),
            "height": pd.array([height] * count, dtype="Int64"),
            "num_images": [images_each] * count,
            "backends": [list(backends)] * count,
        }
    )


def request_key(request: ImageRequest) -> str:
    """What makes a request's image distinct: its prompt, seed and place in the prompt."""
    return f"{request.prompt_id}\0{request.image_index}\0{request.seed}\0{request.prompt}"


class AcceleratorStandIn(ImageBackend):
    """An image backend that takes a fast accelerator's time and returns photos (benchmarks).

    ``stands_in_for`` names the model whose published speed it takes (a key of
    ``device_times``). It also takes that model's name, steps and native size, so plans, content
    addresses and folders look like the real model's. The model id says ``accelerator-stand-in``,
    so no address can ever match a real image's. ``seconds_per_image`` is the device time of
    one ``side`` x ``side`` image (default: the published figure, scaled by pixel count to
    ``side``). A batch of ``n`` images at ``w`` x ``h`` sleeps for
    ``n * seconds_per_image * w * h / side**2``.
    """

    supports_negative_prompt = False

    def __init__(
        self,
        stands_in_for: str = "sdxl_turbo",
        *,
        batch_size: int = 8,
        seconds_per_image: float | None = None,
        side: int | None = None,
        photos: PhotoSource | None = None,
        device_times: Mapping[str, tuple[int, float]] = DEVICE_SECONDS_PER_IMAGE,
    ) -> None:
        if stands_in_for not in device_times:
            raise KeyError(f"no device time for {stands_in_for!r}; known: {sorted(device_times)}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._name = stands_in_for
        table_side, table_seconds = device_times[stands_in_for]
        self.side = side or table_side
        if seconds_per_image is None:  # the published figure, scaled to this side
            seconds_per_image = table_seconds * (self.side / table_side) ** 2
        self.seconds_per_image = seconds_per_image
        self.batch_size = batch_size
        self.photos = photos or PhotoSource()
        spec = MODELS.get(stands_in_for)
        steps = spec.settings.model_fields["steps"].default if spec is not None else 1
        self._settings = GenerationSettings(
            backend=stands_in_for,
            model_id=f"{STAND_IN_DEVICE}/{stands_in_for}",
            revision="main",
            steps=int(steps),
            guidance=0.0,
        )
        self.model_loads = 0
        self.loaded = False
        # Of the last generate call: device time slept, wall time from its first to its last
        # batch, and batches. Wall minus device time is what the step kept the device waiting.
        self.device_seconds = 0.0
        self.generate_seconds = 0.0
        self.generate_started: float | None = None  # time.perf_counter() of the first batch
        self.batches = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def settings(self) -> GenerationSettings:
        return self._settings

    @property
    def default_size(self) -> tuple[int, int]:
        return self.side, self.side

    @property
    def device(self) -> str:
        return STAND_IN_DEVICE

    @property
    def images_per_second(self) -> float:
        """The stand-in's own rate at its native size: what a perfect step would achieve."""
        return 1.0 / self.seconds_per_image if self.seconds_per_image > 0 else float("inf")

    def device_time(self, width: int, height: int) -> float:
        """Seconds of device time one image of this size takes."""
        return self.seconds_per_image * width * height / self.side**2

    def load(self) -> float:
        """Make the photos of the native size: the only host work a model load stands for."""
        if self.loaded:
            return 0.0
        started = time.perf_counter()
        self.photos.pool(self.side, self.side)
        self.loaded = True
        self.model_loads += 1
        return time.perf_counter() - started

    def unload(self) -> None:
        self.loaded = False

    def weight_bytes(self) -> int:
        return self.photos.nbytes()

    def run_summary(self) -> RunSummary:
        return RunSummary(
            metadata={
                "batch_size": self.batch_size,
                "memory_plan": f"{STAND_IN_DEVICE}: sleeps {self.seconds_per_image} s per image",
            }
        )

    def generate(self, requests: Sequence[ImageRequest]) -> Iterator[ImageResult]:
        """Batches of up to ``batch_size`` same-size requests; each sleeps for its device time,
        then yields its photos, in request order, like the diffusers backends."""
        self.load()
        self.device_seconds = self.generate_seconds = 0.0
        self.generate_started, self.batches = None, 0
        by_size: dict[tuple[int, int], list[ImageRequest]] = {}
        for request in requests:
            by_size.setdefault((request.width, request.height), []).append(request)
        for (width, height), same_size in by_size.items():
            self.photos.pool(width, height)  # made before the first batch starts
            for start in range(0, len(same_size), self.batch_size):
                batch = same_size[start : start + self.batch_size]
                started_at = utc_now()
                began = time.perf_counter()
                if self.generate_started is None:
                    self.generate_started = began
                device = len(batch) * self.device_time(width, height)
                time.sleep(device)  # the device computes; the GIL is free meanwhile
                images = [self.photos.photo(width, height, request_key(r)) for r in batch]
                seconds = time.perf_counter() - began
                self.device_seconds += device
                self.batches += 1
                for request, image in zip(batch, images, strict=True):
                    yield ImageResult(
                        request,
                        "ok",
                        image=image,
                        seconds=seconds / len(batch),
                        details={"batch_size": len(batch), "started_at": started_at},
                    )
                self.generate_seconds = time.perf_counter() - self.generate_started


EMBED_DIM = 768  # ViT-L-14's embedding width
# Stand-in embeddings share this much of one common direction, so image-text cosines sit near
# 0.25 (CLIPScores near 25) as real ones do, instead of near 0.
_COMMON = 0.58


class ScorerStandIn(ClipModel):
    """ViT-L-14 at its published rate: real preprocessing and tokenizer, a sleeping image tower.

    ``preprocess`` is the transform open_clip builds for ViT-L-14/openai. It resizes the
    shorter side to 224 px (bicubic, antialiased), centre-crops, makes a tensor and normalises
    with OpenAI's mean and std. ``embed_pixels`` sleeps ``len(batch) / images_per_second``
    without the GIL, then makes an embedding from the batch's 4x4 average-pooled pixels.
    Prompts get fixed pseudo-random embeddings, and the tokenizer counts tokens. The inherited
    ``score_pixels`` then builds every real column from those. The scores mean nothing. Their
    columns, types and the work on the model thread are the real ones.
    """

    def __init__(
        self,
        images_per_second: float = VIT_L_14_IMAGES_PER_SECOND,
        batch_size: int = 32,
        workers: int | None = None,
    ) -> None:
        defaults = ClipModelSettings()
        super().__init__(
            ClipModelSettings(
                model="ViT-L-14",
                pretrained="openai",
                device="cpu",
                batch_size=batch_size,
                workers=defaults.workers if workers is None else workers,
            )
        )
        self.images_per_second = images_per_second
        self.device_seconds = 0.0  # slept in total: the device time of everything scored
        generator = torch.Generator().manual_seed(0)
        self._common = F.normalize(torch.randn(EMBED_DIM, generator=generator), dim=0)
        self._projection = torch.randn(3 * 4 * 4, EMBED_DIM, generator=generator)

    @property
    def model_label(self) -> str:
        return f"{STAND_IN_DEVICE}/ViT-L-14/openai"

    def load(self) -> float:
        """The real preprocessing and tokenizer; no weights (nothing is downloaded)."""
        if self.model is not None:
            return 0.0
        import open_clip

        started = time.perf_counter()
        tag = open_clip.get_pretrained_cfg("ViT-L-14", "openai")
        side = open_clip.get_model_config("ViT-L-14")["vision_cfg"]["image_size"]
        self.preprocess = open_clip.image_transform(
            side,
            is_train=False,
            mean=tag["mean"],
            std=tag["std"],
            interpolation=tag["interpolation"],
            resize_mode=tag["resize_mode"],
        )
        self.tokenizer = open_clip.get_tokenizer("ViT-L-14")
        self.model = STAND_IN_DEVICE  # "loaded"; nothing runs it
        sides = [
            torch.stack([self._ensemble(positives), self._ensemble(negatives)])
            for positives, negatives in ASPECTS.values()
        ]
        self._aspects = torch.stack(sides)
        self.load_seconds = time.perf_counter() - started
        self.model_loads += 1
        return self.load_seconds

    def weight_bytes(self) -> int:
        return self._projection.numel() * self._projection.element_size()

    def _embedding(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(_COMMON * self._common + F.normalize(features, dim=-1), dim=-1)

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        seconds = len(pixels) / self.images_per_second
        time.sleep(seconds)  # the image tower on the device
        self.device_seconds += seconds
        pooled = F.adaptive_avg_pool2d(pixels.float(), 4).flatten(1)
        return self._embedding(pooled @ self._projection)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        for text in texts:
            if text not in self._texts:
                generator = torch.Generator().manual_seed(_digest(text) >> 1)
                self._texts[text] = self._embedding(torch.randn(EMBED_DIM, generator=generator))
        return torch.stack([self._texts[text] for text in texts])
