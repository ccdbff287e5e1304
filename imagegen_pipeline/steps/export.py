"""``imagegen export``: hand the chosen images of a prompt set on, with a manifest CSV.

Chosen: every image shown in review (the newest of each slot) that is not rejected; with
``keepers_only``, only the keepers (the ``keepers`` asset's choice after the reviewers'
verdicts, and any image a reviewer kept). Each image (and its clip, if one was made) goes to
``<backend>/<prompt_id>/<file>`` under the destination, a folder or a ``.zip``, beside
``manifest.csv`` (prompt, backend, seed, LoRA, scores, verdict, path). A zip is written to a
temporary name and renamed, so a killed export leaves no half archive.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path, PurePosixPath

import pandas as pd

from imagegen_pipeline.reviews import VerdictCache
from imagegen_pipeline.steps.review import set_images
from imagegen_pipeline.storage import Storage

MANIFEST_COLUMNS = [
    "prompt_set",
    "backend",
    "prompt_id",
    "image_index",
    "image_id",
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "lora",
    "clip_score",
    "aesthetic",
    "scorer",
    "score",
    "kept",
    "verdict",
    "note",
    "replaces",
    "path",
    "clip",
]


def chosen_images(storage: Storage, prompt_set: str, keepers_only: bool) -> pd.DataFrame:
    """The images an export of ``prompt_set`` holds, in gallery order."""
    rows = set_images(storage, prompt_set, VerdictCache(storage))
    heads = rows[rows["is_head"] & (rows["verdict"] != "reject")]
    if keepers_only:  # the keepers asset's choice (after verdicts), and what reviewers kept
        heads = heads[heads["kept"].eq(True) | (heads["verdict"] == "keep")]
    return heads.sort_values(["prompt_id", "backend", "image_index"], kind="stable")


def export_set(storage: Storage, prompt_set: str, dest: Path, keepers_only: bool = False) -> int:
    """Write the chosen images of ``prompt_set`` and ``manifest.csv`` to ``dest`` (a folder,
    or a file ending in .zip); returns how many images."""
    chosen = chosen_images(storage, prompt_set, keepers_only)
    files: dict[str, bytes] = {}
    manifest = []
    for row in chosen.to_dict("records"):
        folder = PurePosixPath(row["backend"], row["prompt_id"])
        image = folder / PurePosixPath(str(row["path"])).name
        files[str(image)] = storage.read_bytes(row["path"])
        clip = ""
        if isinstance(row.get("clip_path"), str):
            clip = str(folder / PurePosixPath(row["clip_path"]).name)
            files[clip] = storage.read_bytes(row["clip_path"])
        manifest.append({**row, "prompt_set": prompt_set, "path": str(image), "clip": clip})
    table = pd.DataFrame(manifest).reindex(columns=MANIFEST_COLUMNS)
    files["manifest.csv"] = table.to_csv(index=False).encode()
    if dest.suffix.lower() == ".zip":
        dest.parent.mkdir(parents=True, exist_ok=True)
        temp = dest.with_name(f".{dest.name}.tmp")
        buffer = io.BytesIO()
        # PNGs and MP4s are compressed already: stored, not deflated again.
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        temp.write_bytes(buffer.getvalue())
        os.replace(temp, dest)
    else:
        target = Storage(dest)
        for name, data in files.items():
            target.write_bytes(target.path(*PurePosixPath(name).parts), data)
    return len(chosen)
