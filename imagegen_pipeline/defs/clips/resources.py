"""Stable Video Diffusion as a Dagster resource: which images get a clip, and every SVD setting."""

from typing import Literal

import dagster as dg

from imagegen_pipeline.video.svd import SVD_XT, SvdConfig, SvdGenerator


class SvdResource(dg.ConfigurableResource):
    """SVD-XT image-to-video; the defaults are the model card's (1024x576, 25 frames, 7 fps)."""

    model: str = SVD_XT  # hub repo id, or a local folder in the same diffusers layout
    revision: str | None = None  # branch, tag or commit of the hub repo; None means "main"
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"  # auto: fp16 on a GPU
    offload: Literal["none", "model", "sequential"] = "none"  # CPU offload to fit small GPUs
    forward_chunking: bool = False  # chunked UNet feed-forward: less memory, a little slower
    decode_chunk_size: int = 8  # frames decoded at once; halved automatically on out-of-memory
    width: int = 1024  # clip size: the source image is scaled and centre-cropped to it
    height: int = 576
    num_frames: int = 25  # 25 for XT, 14 for the base model
    steps: int = 25  # denoising steps
    fps: int = 7  # frame rate the model is conditioned on and the MP4 plays at
    motion_bucket_id: int = 127  # higher: more motion
    noise_aug_strength: float = 0.02  # noise on the conditioning image: higher drifts further
    min_guidance_scale: float = 1.0  # guidance ramps from min (first frame) to max (last)
    max_guidance_scale: float = 3.0
    selection: Literal["all", "first_n", "top_n"] = "first_n"  # which images of a prompt
    n: int = 1  # images per prompt for first_n / top_n (top_n: best CLIP score first)
    preview_side: int = 256  # longest side of the animated WebP preview
    allow_download: bool = False  # let a step download missing weights (else: a clear error)

    def create_generator(self) -> SvdGenerator:
        """A generator with this configuration, not yet loaded."""
        return SvdGenerator(
            SvdConfig(
                model=self.model,
                revision=self.revision,
                device=self.device,
                dtype=self.dtype,
                width=self.width,
                height=self.height,
                num_frames=self.num_frames,
                steps=self.steps,
                fps=self.fps,
                motion_bucket_id=self.motion_bucket_id,
                noise_aug_strength=self.noise_aug_strength,
                min_guidance_scale=self.min_guidance_scale,
                max_guidance_scale=self.max_guidance_scale,
                decode_chunk_size=self.decode_chunk_size,
                forward_chunking=self.forward_chunking,
                offload=self.offload,
                allow_download=self.allow_download,
            )
        )
