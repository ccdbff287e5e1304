"""Tiny random-weight stand-ins for the real models, in the real Hugging Face repos' layout.

Each model module declares its own builder (``ModelSpec.tiny_builder``, beside the model) from
the shared pieces here (tokenizers, a tiny VAE, sharded and fp16-variant saves,
model_index.json); :func:`build_tiny_model` builds one atomically, once. Each builder writes a
directory that looks like the real repo (``model_index.json``, the same subfolders, config and
weight file names, fp16 variant files where the real repo ships them) but holds models of a few
megabytes at most, with random weights. The project's real loading code
(``DiffusionPipeline.from_pretrained(path, torch_dtype=..., variant=...)``,
``open_clip.create_model_and_transforms(...)``) therefore runs unchanged against them, offline,
in about a second on a CPU. The pictures they make are noise: they test plumbing, not quality.

Nothing here needs the network: tokenizers are written from vocabularies made in code, and
models are instantiated from configs with ``torch.manual_seed(0)``, so builds are deterministic.
This module deliberately does not import Dagster, and imports torch/diffusers/transformers
lazily inside the builders, because importing them costs seconds that callers which only want
:func:`is_tiny_model` should not pay."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagegen_pipeline.model_spec import ModelSpec

if TYPE_CHECKING:
    from transformers import CLIPTextConfig

# Written last into a finished build, so its presence means "complete" (see build_tiny_model).
MARKER_NAME = ".tiny-random-weights"
# Bump when a builder changes what it writes: builds with another version are rebuilt.
FORMAT_VERSION = 1


# Words that get whole-word tokens in the tiny vocabularies, so tokenization exercises BPE
# merges / Unigram word pieces and not only the single-character fallback.
COMMON_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "in",
    "on",
    "with",
    "at",
    "to",
    "for",
    "by",
    "from",
    "is",
    "photo",
    "picture",
    "image",
    "painting",
    "portrait",
    "cat",
    "dog",
    "man",
    "woman",
    "city",
    "street",
    "sky",
    "sun",
    "light",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "style",
    "detailed",
    "high",
    "quality",
    "cinematic",
    "landscape",
]

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte -> printable character table that byte-level BPE vocabularies use."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def write_clip_tokenizer(dest: Path, pad_token: str = "<|endoftext|>") -> int:
    """Write a tiny CLIPTokenizer (vocab.json, merges.txt, configs) into ``dest``; return its size.

    The vocabulary is laid out like OpenAI CLIP's: 256 byte characters, the same with ``</w>``,
    the results of the merges, then ``<|startoftext|>`` and ``<|endoftext|>`` last. Every byte
    is covered, so any prompt tokenizes without unknowns, and end-of-text having the highest id
    keeps the legacy "pooled output = argmax(input_ids)" of CLIP text configs with
    ``eos_token_id=2`` pointing at the right token.
    """
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    known = set(vocab_list)
    # Merge each common word left to right ("c a" -> "ca", "ca t</w>" -> "cat</w>").
    for word in COMMON_WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if merged not in known:
                merges.append(pair)
                vocab_list.append(merged)
                known.add(merged)
            symbols = [merged, *symbols[2:]]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}

    dest.mkdir(parents=True, exist_ok=True)
    write_json(dest / "vocab.json", vocab)
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (dest / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")

    def special(content: str) -> dict[str, Any]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    write_json(
        dest / "special_tokens_map.json",
        {
            "bos_token": special("<|startoftext|>"),
            "eos_token": special("<|endoftext|>"),
            # The real files spell a plain-character pad token ("!") as a bare string.
            "pad_token": special(pad_token) if pad_token.startswith("<|") else pad_token,
            "unk_token": special("<|endoftext|>"),
        },
    )
    write_json(
        dest / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": "<|startoftext|>",
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": "<|endoftext|>",
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": "<|endoftext|>",
        },
    )
    return len(vocab)


def clip_text_config(vocab_size: int, **overrides: Any) -> CLIPTextConfig:
    """A tiny CLIPTextConfig with the real repos' token ids and 77 positions."""
    from transformers import CLIPTextConfig

    # bos/eos/pad ids 0/2/1 are what the real (legacy) configs say; eos_token_id == 2 makes
    # CLIPTextModel pool at argmax(input_ids), i.e. at <|endoftext|>, the highest id.
    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    return CLIPTextConfig(**(settings | overrides))


def write_t5_tokenizer(dest: Path, extra_words: tuple[str, ...] = ()) -> int:
    """Write a tiny T5TokenizerFast (tokenizer.json + configs) built offline; return its size.

    The real one is a 32k SentencePiece Unigram model; this is a Unigram model over single
    characters (with and without the ``▁`` word prefix) plus a few whole words (and
    ``extra_words``), in T5's id layout: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then pieces,
    then 100 ``<extra_id_N>`` last.
    """
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{w}", -4.0) for w in (*COMMON_WORDS, *extra_words)]
    pieces += [(f"▁{c}", -8.0) for c in chars] + [(c, -8.0) for c in chars]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    # model_max_length 512 like the real tokenizer_2: FLUX encodes prompts at 256 tokens.
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=100, model_max_length=512)
    tokenizer.save_pretrained(dest)
    return len(tokenizer)


def save_sharded(model: Any, dest: Path, shards: int, **kwargs: Any) -> None:
    """save_pretrained into about ``shards`` safetensors shards plus an index, like big repos."""
    total_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(dest, max_shard_size=math.ceil(total_bytes / shards) + 1, **kwargs)


def save_with_fp16_variant(model: Any, dest: Path) -> None:
    """Save fp16 variant files and plain fp32 files side by side, as the real repos ship both."""
    # half()/float() rather than to(dtype): diffusers' to() warns about fp32-pinned modules
    # even when there are none.
    model.half().save_pretrained(dest, variant="fp16")
    # The fp32 save comes second so the shared config.json records float32, matching the
    # plain weights that a load without `variant` picks.
    model.float().save_pretrained(dest)


def write_model_index(
    dest: Path,
    class_name: str,
    components: dict[str, tuple[str, str] | tuple[None, None]],
    **pipeline_config: Any,
) -> None:
    """Write model_index.json the way DiffusionPipeline.save_pretrained does."""
    import diffusers

    index: dict[str, Any] = {"_class_name": class_name, "_diffusers_version": diffusers.__version__}
    index |= {name: list(lib_and_class) for name, lib_and_class in components.items()}
    write_json(dest / "model_index.json", index | pipeline_config)


def tiny_vae_kl(latent_channels: int, **config: Any) -> Any:
    """A tiny AutoencoderKL with four levels, so the vae_scale_factor is the real 8."""
    # sample_size is the real 1024: it only sets the tile size of enable_tiling(), which
    # should kick in at the same image sizes as with the real VAE.
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
        sample_size=1024,
        **config,
    )


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _read_marker(path: Path) -> dict[str, Any] | None:
    """The marker's contents; None without a marker, {} for an unreadable one (rebuilt)."""
    try:
        text = (path / MARKER_NAME).read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def is_tiny_model(path: Path) -> bool:
    """True when ``path`` is a tiny random-weight model built by this module."""
    return (Path(path) / MARKER_NAME).is_file()


def build_tiny_model(spec: ModelSpec, root: Path) -> Path:
    """Build the tiny stand-in of ``spec`` into ``root/<real repo dir name>`` (once) and return
    that path."""
    if spec.tiny_builder is None:
        raise KeyError(f"{spec.name} has no tiny stand-in (a hosted API needs none)")
    root = Path(root)
    final = root / spec.tiny_dir_name
    marker = _read_marker(final)
    if marker is not None and marker.get("format_version") == FORMAT_VERSION:
        return final
    if marker is None and final.exists() and not (final.is_dir() and not any(final.iterdir())):
        # Never overwrite something we did not build: it may be the real model.
        raise FileExistsError(f"{final} exists and is not a tiny model (no {MARKER_NAME})")

    root.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename it into place, so readers (and concurrent
    # builders) only ever see a missing or a complete directory, never a half-written one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=root))
    # mkdtemp makes the directory private (0700); the model should be as readable as any file.
    tmp.chmod(0o755)
    try:
        import torch
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        # A progress bar per saved shard would bury the demo's own output.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        # Builders seed torch themselves; forking keeps the caller's RNG state untouched.
        with torch.random.fork_rng(devices=[]):
            spec.tiny_builder(tmp)
        write_json(
            tmp / MARKER_NAME,
            {
                "warning": "RANDOM WEIGHTS: a tiny stand-in for tests; its images are noise.",
                "name": spec.name,
                "real_repo": spec.default_model,
                "format_version": FORMAT_VERSION,
            },
        )
        if marker is not None:
            # A stale build from an older FORMAT_VERSION: move it aside, then swap.
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=root))
            with contextlib.suppress(FileNotFoundError):  # another builder moved it first
                os.replace(final, stale / final.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first; its build is as good as ours.
            if not is_tiny_model(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
