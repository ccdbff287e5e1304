"""ControlNet inputs named in a prompt CSV: the control image, its type and scale, and its map.

A row's ``control_image`` (relative to the CSV's folder) steers composition through a ControlNet
of ``control_type``:

- ``canny``: the edges of the image, found here (Canny, as OpenCV's ``Canny(image, 100, 200)``
  that the diffusers ControlNet examples use), are the control map;
- ``depth`` and ``pose``: the image already is the map (a depth map, an OpenPose skeleton) made
  with the estimator of the user's choice; no estimator ships with the project;
- ``none``: the image already is a map for the backend's ``none`` ControlNet (by default its
  canny one: an edge or line drawing made elsewhere).

The map is a deterministic function of the image's bytes, its type and the image size, so the
image's sha256 with the type and scale identify the control in content addresses. Dagster-free
and torch-free: numpy and Pillow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

CONTROL_TYPES = ("canny", "depth", "pose", "none")
DEFAULT_CONTROL_TYPE = "canny"
DEFAULT_CONTROL_SCALE = 1.0
MAX_CONTROL_SCALE = 2.0
# OpenCV's thresholds in the diffusers ControlNet examples, on 0-255 gradients.
CANNY_LOW, CANNY_HIGH = 100.0, 200.0


@dataclass(frozen=True)
class ControlInput:
    """One row's control: the image file, what kind of map it gives and how strongly."""

    path: Path
    sha256: str  # of the image file's bytes
    type: str
    scale: float

    def describe(self, used_as: str = "controlnet") -> str:
        """The JSON recorded with each image: source, file hash, type, scale, and how the
        backend used it (``controlnet``, or ``reference``: an input image of a hosted API)."""
        return json.dumps(
            {
                "image": str(self.path),
                "sha256": self.sha256,
                "type": self.type,
                "scale": self.scale,
                "used_as": used_as,
            }
        )


def resolve_control_image(cell: str, folder: Path) -> Path:
    """The control image of a CSV cell (relative to ``folder``), checked to be a readable image;
    ValueError says what is wrong."""
    path = Path(cell).expanduser()
    path = path if path.is_absolute() else (folder / path)
    path = path.resolve()
    if not path.is_file():
        raise ValueError(f"control image {cell!r} not found (looked for {path})")
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"control image {cell!r} is not a readable image ({error})") from None
    return path


def control_of(image: str, control_type: str, scale: float) -> ControlInput | None:
    """The control of a validated prompt row (None when the row has no control image)."""
    if not image:
        return None
    path = Path(image)
    stat = path.stat()
    return ControlInput(
        path, _file_sha256(path, stat.st_size, stat.st_mtime_ns), control_type, scale
    )


@cache
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too: many rows share one image, and an edited file is re-read.
    return hashlib.sha256(path.read_bytes()).hexdigest()


def control_map(control: ControlInput, width: int, height: int) -> Image.Image:
    """The RGB control map of ``control`` at the image size the pipeline makes."""
    with Image.open(control.path) as source:
        image = source.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    if control.type != "canny":
        return image
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    edges = canny_edges(gray, CANNY_LOW, CANNY_HIGH)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def canny_edges(gray: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny edges of a 0-255 grayscale array as 0/255 uint8: 3x3 Sobel with the L1 gradient,
    thinned along the gradient, kept where strong or connected to a strong edge."""
    padded = np.pad(gray, 1, mode="edge")

    def window(dy: int, dx: int) -> np.ndarray:
        h, w = gray.shape
        return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (window(-1, 1) + 2 * window(0, 1) + window(1, 1)) - (
        window(-1, -1) + 2 * window(0, -1) + window(1, -1)
    )
    gy = (window(1, -1) + 2 * window(1, 0) + window(1, 1)) - (
        window(-1, -1) + 2 * window(-1, 0) + window(-1, 1)
    )
    magnitude = np.abs(gx) + np.abs(gy)
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    # Each pixel's two neighbours across the edge, by the gradient direction rounded to 45°.
    sector = (np.round(angle / 45.0).astype(int)) % 4
    offsets = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    mag_padded = np.pad(magnitude, 1)
    h, w = gray.shape
    thin = np.zeros_like(magnitude)
    for direction, (dy, dx) in offsets.items():
        ahead = mag_padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        behind = mag_padded[1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        keep = (sector == direction) & (magnitude >= ahead) & (magnitude > behind)
        thin[keep] = magnitude[keep]
    strong = thin >= high
    candidate = thin >= low
    edges = strong
    while True:  # hysteresis: grow the strong edges into connected weak ones
        grown = _dilate(edges) & candidate
        if np.array_equal(grown, edges):
            break
        edges = grown
    return edges.astype(np.uint8) * 255


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return out
