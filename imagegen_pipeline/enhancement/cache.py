"""The on-disk cache of LLM-enhanced prompts: one small JSON file per (method, model, prompt,
style), written atomically through the project's storage (a folder or an object store)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from upath import UPath

from imagegen_pipeline.storage import Storage


@dataclass
class EnhancementCache:
    """Enhanced prompts in storage, one JSON file per (method, model, prompt, style)."""

    folder: str | os.PathLike[str]  # a local folder or an object-store URL (see storage.py)
    version: int = 1  # of the instruction sent to the LLMs: answers to another are not reused
    _storage: Storage = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._storage = Storage(self.folder)

    def _path(self, method: str, model: str, prompt: str, style: str) -> UPath:
        key = json.dumps([self.version, method, model, prompt, style])
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self._storage.path(digest[:2], f"{digest}.json")

    def get(self, method: str, model: str, prompt: str, style: str) -> str | None:
        """The cached text, or None (a missing or unreadable entry is a miss)."""
        path = self._path(method, model, prompt, style)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        text = entry.get("text") if isinstance(entry, dict) else None
        return text if isinstance(text, str) and text else None

    def put(self, method: str, model: str, prompt: str, style: str, text: str) -> None:
        """Store ``text`` atomically: a reader never sees half an entry."""
        entry = {"method": method, "model": model, "prompt": prompt, "style": style, "text": text}
        data = json.dumps(entry, ensure_ascii=False).encode()
        self._storage.write_bytes(self._path(method, model, prompt, style), data)
