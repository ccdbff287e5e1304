"""The prompt sets of a prompts folder: one per CSV file, named safely from the file name."""

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

# Prompt-set names become folder and file names with prefixes and suffixes (temporary Parquet
# files among them); file systems allow 255 bytes.
MAX_SET_NAME_BYTES = 100
SET_NAME_HASH_CHARS = 8


def prompt_set_name(csv_path: Path) -> str:
    """The prompt set of a CSV file: its stem made safe as a file or folder name, an object-store
    key and a Dagster partition key (multi-partition keys join with '|').

    Letters, digits and marks of any script are kept, as are '.', '_' and '-'; anything else
    becomes '_', runs of dots one dot, and a name is cut to ``MAX_SET_NAME_BYTES`` UTF-8 bytes.
    A name that had to be changed or cut ends in '-' and a hash of the stem, so ``a,b`` and
    ``a|b`` stay two sets.
    """
    stem = unicodedata.normalize("NFC", csv_path.stem)
    safe = "".join(c if c in "._-" or unicodedata.category(c)[0] in "LNM" else "_" for c in stem)
    safe = re.sub(r"\.{2,}", ".", safe).lstrip(".")
    if safe == stem and len(safe.encode()) <= MAX_SET_NAME_BYTES:
        return safe
    suffix = "-" + hashlib.sha256(stem.encode()).hexdigest()[:SET_NAME_HASH_CHARS]
    room = MAX_SET_NAME_BYTES - len(suffix)
    # Cut on a character boundary, never inside a UTF-8 sequence.
    cut = safe.encode()[:room].decode(errors="ignore").rstrip(".")
    return (cut or "prompts") + suffix


@dataclass
class PromptFolder:
    """The CSV files of a prompts folder by prompt set; a set with two files is refused."""

    paths: dict[str, list[Path]]

    @property
    def files(self) -> dict[str, Path]:
        """The usable sets: one file each."""
        return {name: paths[0] for name, paths in self.paths.items() if len(paths) == 1}

    @property
    def problems(self) -> dict[str, str]:
        """The refused sets, each with a message naming its files."""
        return {
            name: f"Prompt set {name!r}: {' and '.join(str(p) for p in paths)} map to the same "
            "set (names that differ only by case or by characters replaced with '_'); "
            "rename one of them"
            for name, paths in self.paths.items()
            if len(paths) > 1
        }


def find_prompt_csvs(folder: str | Path) -> PromptFolder:
    """Every CSV file (any case of '.csv') of ``folder``, grouped by prompt set.

    Sets are told apart case-insensitively: on macOS and Windows disks ``X`` and ``x`` would
    be one output folder.
    """
    files = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() == ".csv" and p.is_file())
    by_key: dict[str, list[Path]] = {}
    names: dict[str, str] = {}
    for path in files:
        name = prompt_set_name(path)
        key = name.casefold()
        names.setdefault(key, name)
        by_key.setdefault(key, []).append(path)
    return PromptFolder({names[key]: paths for key, paths in by_key.items()})
