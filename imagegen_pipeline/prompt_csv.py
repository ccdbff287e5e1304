"""Read and validate one prompt CSV.

Each bad row is rejected with its file, line, field and reason; valid rows go on. Only a file
that cannot be read as a whole (not UTF-8, not CSV, no ``prompt`` column, no valid row) raises.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

STYLES = ("photorealistic", "artistic", "cinematic", "anime", "none")
BACKEND_NAMES = ("flux_schnell", "sdxl_turbo", "gemini")
KNOWN_COLUMNS = (
    "prompt_id",
    "prompt",
    "style",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "num_images",
    "backends",
)
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 2048, 16
MAX_IMAGES_PER_PROMPT = 16
MAX_PROMPT_CHARS = 2000
# Ids become file and folder names: letters, digits, '.', '_' and '-', not starting with '.'.
SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")

VALID_COLUMNS = (
    "prompt_id",
    "line",
    "prompt",
    "style",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "num_images",
    "backends",
)
REJECTED_COLUMNS = ("file", "line", "field", "reason", "value", "row")


class PromptFileError(ValueError):
    """The file as a whole cannot be used; the message names the file and what to fix."""

    def __init__(self, message: str, rejected: pd.DataFrame | None = None) -> None:
        super().__init__(message)
        # The rows that were read and rejected, kept even when the file as a whole fails.
        self.rejected = rejected if rejected is not None else pd.DataFrame(columns=REJECTED_COLUMNS)


@dataclass
class PromptTable:
    """The valid rows of a prompt CSV and one row per problem found in the others."""

    valid: pd.DataFrame
    rejected: pd.DataFrame

    @property
    def rejected_rows(self) -> int:
        """How many CSV rows were rejected (a row with two problems counts once)."""
        return int(self.rejected["line"].nunique()) if len(self.rejected) else 0


def prompt_set_name(csv_path: Path) -> str:
    """The partition key of a prompt CSV: its file stem, made safe for paths and partitions."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", csv_path.stem).lstrip(".") or "prompts"


def derived_prompt_id(prompt: str) -> str:
    """A stable id for a row without one, so seeds survive rows being added or reordered."""
    return "p-" + hashlib.sha256(prompt.encode()).hexdigest()[:10]


def _parse_int(
    raw: str, field: str, lo: int, hi: int, multiple: int = 1
) -> tuple[int | None, str | None]:
    try:
        value = int(raw)
    except ValueError:
        return None, f"{field} must be an integer, got {raw!r}"
    if not lo <= value <= hi:
        return None, f"{field} must be between {lo} and {hi}, got {value}"
    if value % multiple:
        return None, f"{field} must be a multiple of {multiple}, got {value}"
    return value, None


def _split_backends(raw: str) -> list[str]:
    return [part for part in re.split(r"[;,|\s]+", raw.strip()) if part]


def read_prompt_csv(path: Path) -> PromptTable:
    """Validate ``path``; raises :class:`PromptFileError` only when no row can be used."""
    name = str(path)
    if path.suffix.lower() != ".csv":
        raise PromptFileError(f"{name}: not a CSV file (expected a .csv extension)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(
            f"{name}: not UTF-8 text (byte {exc.start} is {path.read_bytes()[exc.start]:#04x}); "
            "save the file as UTF-8 CSV"
        ) from None
    if "\x00" in text:
        raise PromptFileError(f"{name}: binary data, not a CSV file")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        header = [column.strip() for column in (reader.fieldnames or [])]
    except csv.Error as exc:
        raise PromptFileError(f"{name}: not a readable CSV file ({exc})") from None
    if "prompt" not in header:
        raise PromptFileError(
            f"{name}: missing required column 'prompt' "
            f"(found columns: {', '.join(header) or 'none'})"
        )
    reader.fieldnames = header

    valid: list[dict] = []
    problems: list[dict] = []
    seen_ids: dict[str, int] = {}
    try:
        for record in reader:
            line = reader.line_num
            row = {key: (value or "").strip() for key, value in record.items() if key is not None}
            errors: list[tuple[str, str]] = []

            prompt = row.get("prompt", "")
            if not prompt:
                errors.append(("prompt", "empty prompt"))
            elif len(prompt) > MAX_PROMPT_CHARS:
                errors.append(("prompt", f"prompt longer than {MAX_PROMPT_CHARS} characters"))

            style = (row.get("style") or "none").lower()
            if style not in STYLES:
                errors.append(("style", f"unknown style {style!r}; use one of {', '.join(STYLES)}"))

            prompt_id = row.get("prompt_id") or (derived_prompt_id(prompt) if prompt else "")
            if row.get("prompt_id") and (not SAFE_ID.match(prompt_id) or ".." in prompt_id):
                errors.append(
                    ("prompt_id", "unsafe prompt_id: use 1-64 letters, digits, '.', '_' or '-'")
                )
            elif prompt_id and prompt_id in seen_ids:
                errors.append(
                    ("prompt_id", f"duplicate prompt_id (first used on line {seen_ids[prompt_id]})")
                )

            seed = None
            if row.get("seed"):
                seed, error = _parse_int(row["seed"], "seed", 0, 2**31 - 1)
                if error:
                    errors.append(("seed", error))
            sizes: dict[str, int | None] = {}
            for side in ("width", "height"):
                sizes[side] = None
                if row.get(side):
                    sizes[side], error = _parse_int(
                        row[side], side, MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE
                    )
                    if error:
                        errors.append((side, error))
            num_images = 1
            if row.get("num_images"):
                parsed, error = _parse_int(
                    row["num_images"], "num_images", 1, MAX_IMAGES_PER_PROMPT
                )
                if error:
                    errors.append(("num_images", error))
                num_images = parsed or 1
            backends = _split_backends(row.get("backends", ""))
            unknown = [b for b in backends if b not in BACKEND_NAMES]
            if unknown:
                errors.append(
                    (
                        "backends",
                        f"unknown backend(s) {', '.join(unknown)}; use {', '.join(BACKEND_NAMES)}",
                    )
                )

            if errors:
                raw = json.dumps(row, ensure_ascii=False)
                problems.extend(
                    {
                        "file": name,
                        "line": line,
                        "field": field,
                        "reason": reason,
                        "value": row.get(field, ""),
                        "row": raw,
                    }
                    for field, reason in errors
                )
                continue
            seen_ids[prompt_id] = line
            valid.append(
                {
                    "prompt_id": prompt_id,
                    "line": line,
                    "prompt": prompt,
                    "style": style,
                    "negative_prompt": row.get("negative_prompt", ""),
                    "seed": seed,
                    "width": sizes["width"],
                    "height": sizes["height"],
                    "num_images": num_images,
                    "backends": backends or list(BACKEND_NAMES),
                }
            )
    except csv.Error as exc:
        raise PromptFileError(
            f"{name}, line {reader.line_num}: not a readable CSV file ({exc})"
        ) from None

    rejected = pd.DataFrame(problems, columns=list(REJECTED_COLUMNS))
    if not valid:
        reasons = "; ".join(f"line {p['line']} {p['field']}: {p['reason']}" for p in problems[:5])
        raise PromptFileError(
            f"{name}: no valid prompt row" + (f" ({reasons})" if reasons else ""), rejected
        )
    table = pd.DataFrame(valid, columns=list(VALID_COLUMNS))
    for column in ("seed", "width", "height"):
        table[column] = table[column].astype("Int64")
    return PromptTable(valid=table, rejected=rejected)
