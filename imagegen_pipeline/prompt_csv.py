"""Read and validate one prompt CSV.

``PromptRow`` holds the rules for one row. Each bad row is rejected with its file, line, field
and reason, and the valid rows go on. Only a file that cannot be read as a whole raises
``PromptFileError``: not UTF-8, not CSV, no ``prompt`` column, or no valid row.
"""

import csv
import hashlib
import io
import json
import tomllib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    computed_field,
    model_validator,
)
from pydantic_core import ErrorDetails

from imagegen_pipeline import prompt_cells as cells
from imagegen_pipeline.control import DEFAULT_CONTROL_SCALE
from imagegen_pipeline.records import PROMPT_COLUMNS
from imagegen_pipeline.registry import BACKEND_NAMES, backend_spec
from imagegen_pipeline.text_encoders import CLIP_TOKEN_LIMIT, count_clip_tokens

MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 2048, 16
MAX_IMAGES_PER_PROMPT = 16
MAX_CANDIDATES = 64  # best-of-N draws per prompt, gate retries included
# A hard cap well above real prompts that still stops a pasted document. A prompt longer than
# CLIP reads is accepted and flagged (see PromptRow.prompt_truncated_by_encoders).
MAX_PROMPT_CHARS = 20_000
# Ids become file and folder names: 1-64 letters, digits, '.', '_' or '-', no leading '.', no '..'.
SAFE_ID = r"^(?!\.)(?!.*\.\.)[A-Za-z0-9._-]{1,64}$"

REJECTED_COLUMNS = ("file", "line", "field", "reason", "value", "row")


def derived_prompt_id(prompt: str) -> str:
    """A stable id for a row without one, so seeds survive rows being added or reordered."""
    return "p-" + hashlib.sha256(prompt.encode()).hexdigest()[:10]


Side = Annotated[int, cells.int_range(MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE)]


class PromptRow(BaseModel):
    """One valid CSV row. The reader leaves empty cells out, so their columns take the default."""

    # python-re: SAFE_ID needs look-aheads, which pydantic's default regex engine lacks.
    model_config = ConfigDict(str_strip_whitespace=True, regex_engine="python-re")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    # Declared after ``prompt``: the default is derived from the validated prompt.
    prompt_id: str = Field(
        default_factory=lambda data: derived_prompt_id(data["prompt"]), pattern=SAFE_ID
    )
    style: Annotated[str, BeforeValidator(cells.style)] = "none"
    negative_prompt: str = ""
    seed: Annotated[int, cells.int_range(0, 2**31 - 1)] | None = None
    width: Side | None = None
    height: Side | None = None
    num_images: Annotated[int, cells.int_range(1, MAX_IMAGES_PER_PROMPT)] = 1
    # Validating the default "" runs the splitter, which turns "no backend named" into all.
    backends: Annotated[list[str], BeforeValidator(cells.backends)] = Field(
        default="", validate_default=True
    )
    # Declared after ``backends``: each adapter is checked against every backend of the row.
    lora: Annotated[str, AfterValidator(cells.loras)] = ""
    control_image: Annotated[str, AfterValidator(cells.control_image)] = ""
    # Declared after ``control_image``: the type's default depends on an image being given.
    control_type: Annotated[str, AfterValidator(cells.control_type)] = Field(
        default="", validate_default=True
    )
    control_scale: Annotated[float, BeforeValidator(cells.control_scale)] = DEFAULT_CONTROL_SCALE
    # Best-of-N (steps/best_of_n.py): empty cells keep every image made (N = select = num_images).
    candidates: Annotated[int, cells.int_range(1, MAX_CANDIDATES)] | None = None
    select: Annotated[int, cells.int_range(1, MAX_IMAGES_PER_PROMPT)] | None = None
    scorer: Annotated[str, BeforeValidator(cells.scorer)] = ""
    min_score: Annotated[float, Field(allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _enough_candidates(self) -> "PromptRow":
        keepers = self.select or self.num_images
        if self.candidates is not None and self.candidates < keepers:
            raise ValueError(f"candidates ({self.candidates}) must be at least select ({keepers})")
        return self

    @computed_field
    @property
    def prompt_truncated_by_encoders(self) -> bool:
        """True when the prompt is longer than CLIP's 77 tokens: CLIP ignores the rest."""
        return count_clip_tokens(self.prompt) > CLIP_TOKEN_LIMIT


KNOWN_COLUMNS = tuple(PromptRow.model_fields)
# The table's columns: every field of PromptRow and the CSV line (records.PROMPT_COLUMNS, which
# enhancement passes on; tests/test_prompt_csv.py checks that no field is left out).
VALID_COLUMNS = PROMPT_COLUMNS

# Reasons for pydantic's own checks, worded like the custom validators' messages.
_REASONS = {
    "missing": "empty {field}",
    "string_too_short": "empty {field}",
    "string_too_long": "{field} longer than {max_length} characters",
    "string_pattern_mismatch": (
        "unsafe {field}: use 1-64 letters, digits, '.', '_' or '-' (no leading '.', no '..')"
    ),
}


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


# Columns a set's sidecar cannot default: they tell one row from another.
ROW_ONLY_COLUMNS = ("prompt", "prompt_id", "seed")


@dataclass
class SetDefaults:
    """A prompt set's sidecar ``<set>.toml`` beside its CSV: defaults for the set's rows (a
    row's own non-empty cell wins) and, as tables named by backend, that backend's settings
    for this set only."""

    rows: dict[str, str]
    backend_settings: dict[str, dict[str, Any]]


def set_defaults_path(csv_path: Path) -> Path:
    """Where a CSV's sidecar lives: the same folder and stem, ``.toml``."""
    return csv_path.with_suffix(".toml")


def source_digest(paths: list[Path]) -> str:
    """What tells one version of a prompt set's source from another: its file's bytes and its
    sidecar's (and, for a set that several files map to, their names too, so renaming one of
    them counts as a change)."""
    digest = hashlib.sha256()
    for path in paths:
        if len(paths) > 1:
            digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
        sidecar = set_defaults_path(path)
        if sidecar.is_file():
            digest.update(b"\0sidecar\0" + sidecar.read_bytes())
    return digest.hexdigest()[:16]


def read_set_defaults(csv_path: Path) -> SetDefaults:
    """The sidecar of ``csv_path`` (none: no defaults), checked as a row would be; raises
    :class:`PromptFileError` naming the sidecar and the key of the first problem."""
    path = set_defaults_path(csv_path)
    if not path.is_file():
        return SetDefaults({}, {})
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"{path}: not a readable TOML file ({exc})") from None
    tables = {key: value for key, value in data.items() if isinstance(value, dict)}
    rows = {key: _cell_text(value) for key, value in data.items() if key not in tables}
    for key in rows:
        if key not in KNOWN_COLUMNS or key in ROW_ONLY_COLUMNS:
            allowed = [c for c in KNOWN_COLUMNS if c not in ROW_ONLY_COLUMNS]
            raise PromptFileError(f"{path}: unknown key {key!r}; use {', '.join(allowed)}")
    _, reasons = _check_row({"prompt": "-", **rows}, {}, csv_path.parent, from_set=set(rows))
    if reasons:
        field, reason = reasons[0]
        raise PromptFileError(f"{path}, {field}: {reason}")
    for name, settings in tables.items():
        if name not in BACKEND_NAMES:
            raise PromptFileError(
                f"{path}: [{name}] is not a backend; use {', '.join(BACKEND_NAMES)}"
            )
        allowed = backend_spec(name).per_set_settings
        unknown = sorted(set(settings) - set(allowed))
        if unknown:
            raise PromptFileError(
                f"{path}, [{name}]: setting(s) {', '.join(unknown)} cannot be set per prompt "
                f"set; " + (f"use {', '.join(allowed)}" if allowed else "set them in imagegen.toml")
            )
    return SetDefaults(rows, tables)


def _cell_text(value: Any) -> str:
    """A TOML value as the CSV cell it stands for (a list joins with ';', like ``lora``)."""
    if isinstance(value, list):
        return ";".join(str(item) for item in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def read_prompt_csv(path: Path) -> PromptTable:
    """Validate ``path``, its rows on top of its sidecar's defaults (``read_set_defaults``);
    raises :class:`PromptFileError` only when no row can be used."""
    name = str(path)
    defaults = read_set_defaults(path).rows
    # The lines exactly as csv reads them, so a row's first line can be found by number.
    lines = io.StringIO(_read_text(path), newline="").readlines()
    reader = _dict_reader(name, lines)

    valid: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    seen_ids: dict[str, int] = {}  # prompt_id -> line of the valid row that has it
    try:
        for line, record in _rows_with_start_lines(reader, lines):
            cells = {key: (value or "").strip() for key, value in record.items() if key is not None}
            own = _non_empty(cells)
            given = defaults | own
            row, reasons = _check_row(given, seen_ids, path.parent, set(defaults) - set(own))
            if row is None:
                raw = json.dumps(cells, ensure_ascii=False)
                problems.extend(
                    {
                        "file": name,
                        "line": line,
                        "field": field,
                        "reason": reason,
                        "value": given.get(field, ""),
                        "row": raw,
                    }
                    for field, reason in reasons
                )
            else:
                seen_ids[row.prompt_id] = line
                valid.append({"line": line, **row.model_dump()})
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
    for column in ("seed", "width", "height", "candidates", "select"):
        table[column] = table[column].astype("Int64")
    return PromptTable(valid=table, rejected=rejected)


def _read_text(path: Path) -> str:
    name = str(path)
    if path.suffix.lower() != ".csv":
        raise PromptFileError(f"{name}: not a CSV file (expected a .csv extension)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: spreadsheets often start UTF-8 with a BOM
    except UnicodeDecodeError as exc:
        raise PromptFileError(
            f"{name}: not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x}); "
            "save the file as UTF-8 CSV"
        ) from None
    if "\x00" in text:
        raise PromptFileError(f"{name}: binary data, not a CSV file")
    return text


def _dict_reader(name: str, lines: list[str]) -> csv.DictReader:
    """A DictReader over ``lines`` with the right delimiter and a stripped header."""
    try:
        reader = csv.DictReader(lines, delimiter=_delimiter(name, lines), strict=True)
        header = [column.strip() for column in reader.fieldnames or []]
    except csv.Error as exc:
        raise PromptFileError(f"{name}: not a readable CSV file ({exc})") from None
    reader.fieldnames = header
    return reader


def _delimiter(name: str, lines: list[str]) -> str:
    """The delimiter, chosen from the header alone.

    Commas are the format. Spreadsheets in comma-decimal locales save ';'-separated files, and
    some tools save tab-separated ones: such a file is read as it is when its header splits on
    ';' (or tab) into a ``prompt`` column and other known columns only. If that split also gives
    unknown columns, the delimiter is a guess, so the file is refused with a message saying so.
    """

    def header(delimiter: str) -> list[str]:
        first = next(csv.reader(lines, delimiter=delimiter, strict=True), [])
        return [column.strip() for column in first]

    columns = header(",")
    if "prompt" in columns:
        return ","
    for delimiter, label in ((";", "';'"), ("\t", "tab")):
        split = header(delimiter)
        if "prompt" not in split:
            continue
        if set(split) <= set(KNOWN_COLUMNS):
            return delimiter
        raise PromptFileError(
            f"{name}: looks {label}-separated (columns {', '.join(split)}); "
            "save it with commas between columns"
        )
    raise PromptFileError(
        f"{name}: missing required column 'prompt' (found columns: {', '.join(columns) or 'none'})"
    )


def _rows_with_start_lines(
    reader: csv.DictReader, lines: list[str]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each row with the line it starts on (``reader.line_num`` is the line it ends on)."""
    end = reader.line_num
    for record in reader:
        # The row starts after the previous one, past the blank lines DictReader skips.
        start = end + 1
        while not lines[start - 1].strip("\r\n"):
            start += 1
        end = reader.line_num
        yield start, record


def _check_row(
    cells: dict[str, str],
    seen_ids: dict[str, int],
    folder: Path,
    from_set: Collection[str] = (),
) -> tuple[PromptRow | None, list[tuple[str, str]]]:
    """The valid row, or None and every (field, reason) that rejects it (LoRA and control
    files are relative to ``folder``, the CSV's; ``from_set``: the keys the set's sidecar
    gave rather than the row)."""
    given = _non_empty(cells)
    context = {"folder": folder, "from_set": from_set}
    try:
        row: PromptRow | None = PromptRow.model_validate(given, context=context)
    except ValidationError as exc:
        row = None
        # Skip default_factory_not_called: prompt_id has no default because the prompt is bad.
        errors = (e for e in exc.errors() if e["type"] != "default_factory_not_called")
        reasons = [_reason(error) for error in errors]
    else:
        reasons = []
    prompt_id = row.prompt_id if row else _prompt_id(given)
    if prompt_id in seen_ids:
        reasons.append(
            ("prompt_id", f"duplicate prompt_id (first used on line {seen_ids[prompt_id]})")
        )
    return (None if reasons else row), reasons


def _non_empty(cells: dict[str, str]) -> dict[str, str]:
    """The cells that hold a value: an empty cell takes the set's default, then the column's."""
    return {column: value for column, value in cells.items() if value}


def _prompt_id(given: dict[str, str]) -> str | None:
    """The id of a row rejected for other columns, so a repeated id is reported too.

    None when the prompt or the prompt_id is itself invalid.
    """
    identity = {column: given[column] for column in ("prompt", "prompt_id") if column in given}
    try:
        return PromptRow.model_validate(identity).prompt_id
    except ValidationError:
        return None


def _reason(error: ErrorDetails) -> tuple[str, str]:
    """(field, reason) for one pydantic error, in the words a person editing the CSV reads."""
    field = str(error["loc"][0]) if error["loc"] else "row"
    if error["type"] == "value_error":  # raised by our validators: the message is the reason
        return field, str(error.get("ctx", {}).get("error", error["msg"]))
    template = _REASONS.get(error["type"])
    if template is None:
        return field, f"{field}: {error['msg']}"
    return field, template.format(field=field, **error.get("ctx", {}))
