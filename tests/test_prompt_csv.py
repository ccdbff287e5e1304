"""Prompt CSV validation: every rejection reason, and whole-file failures."""

import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.partitions.utils.base import (  # the check Dagster applies to keys
    raise_error_on_invalid_partition_key_substring,
)

from imagegen_pipeline.prompt_csv import (
    MAX_PROMPT_CHARS,
    PromptFileError,
    derived_prompt_id,
    read_prompt_csv,
)
from imagegen_pipeline.prompt_folder import MAX_SET_NAME_BYTES, find_prompt_csvs, prompt_set_name
from imagegen_pipeline.registry import BACKEND_NAMES
from imagegen_pipeline.text_encoders import count_clip_tokens


def write(tmp_path: Path, text: str, name: str = "set.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ('ok1,"",none,,,,', "prompt", "empty prompt"),
        ("ok1,a cat,watercolor,,,,", "style", "unknown style 'watercolor'"),
        ("ok1,a cat,none,abc,,,", "seed", "seed must be an integer, got 'abc'"),
        ("ok1,a cat,none,-5,,,", "seed", "seed must be between 0 and"),
        ("ok1,a cat,none,,500,,", "width", "width must be a multiple of 16, got 500"),
        ("ok1,a cat,none,,4096,,", "width", "width must be between 64 and 2048"),
        ("ok1,a cat,none,,,100,", "height", "height must be a multiple of 16"),
        ("ok1,a cat,none,,,,0", "num_images", "num_images must be between 1 and 16"),
        ("ok1,a cat,none,,,,99", "num_images", "num_images must be between 1 and 16"),
        ("../../etc/passwd,a cat,none,,,,", "prompt_id", "unsafe prompt_id"),
        (".hidden,a cat,none,,,,", "prompt_id", "unsafe prompt_id"),
        ("a/b,a cat,none,,,,", "prompt_id", "unsafe prompt_id"),
    ],
)
def test_each_bad_row_is_rejected_with_file_line_field_reason(tmp_path, row, field, reason):
    path = write(
        tmp_path,
        "prompt_id,prompt,style,seed,width,height,num_images\n"
        "good,a lighthouse in a storm,cinematic,1,512,512,2\n" + row + "\n",
    )
    table = read_prompt_csv(path)

    assert list(table.valid["prompt_id"]) == ["good"]
    assert table.rejected_rows == 1
    problem = table.rejected.iloc[0]
    assert problem["file"] == str(path)
    assert problem["line"] == 3
    assert problem["field"] == field
    assert reason in problem["reason"]


def test_duplicate_id_and_unknown_backend_are_rejected_and_valid_rows_go_on(tmp_path):
    path = write(
        tmp_path,
        "prompt_id,prompt,backends\n"
        "a,first prompt here,flux_schnell\n"
        "a,second prompt here,\n"
        "b,third prompt here,dalle\n"
        "c,fourth prompt here,sdxl_turbo;flux_schnell\n",
    )
    table = read_prompt_csv(path)

    assert list(table.valid["prompt_id"]) == ["a", "c"]
    assert list(table.valid["backends"].iloc[1]) == ["sdxl_turbo", "flux_schnell"]
    reasons = dict(zip(table.rejected["line"], table.rejected["reason"], strict=True))
    assert "duplicate prompt_id (first used on line 2)" in reasons[3]
    assert "unknown backend(s) dalle" in reasons[4]


def test_a_rejected_row_is_also_told_its_id_is_taken(tmp_path):
    path = write(tmp_path, "prompt_id,prompt,seed\na,first prompt,1\na,second prompt,x\n")
    rejected = read_prompt_csv(path).rejected

    assert sorted(rejected["field"]) == ["prompt_id", "seed"]
    assert set(rejected["line"]) == {3}


def test_a_row_with_several_problems_counts_once_and_keeps_every_reason(tmp_path):
    path = write(tmp_path, "prompt,style,seed\nok prompt,none,1\n,cubist,x\n")
    table = read_prompt_csv(path)

    assert table.rejected_rows == 1
    assert sorted(table.rejected["field"]) == ["prompt", "seed", "style"]


def test_defaults_and_derived_ids_are_stable(tmp_path):
    path = write(tmp_path, "prompt\na lighthouse in a storm\n")
    row = read_prompt_csv(path).valid.iloc[0]

    assert row["prompt_id"] == derived_prompt_id("a lighthouse in a storm")
    assert row["style"] == "none"
    assert row["num_images"] == 1
    assert list(row["backends"]) == list(BACKEND_NAMES)
    assert not row["prompt_truncated_by_encoders"]


def test_every_row_field_is_a_table_column():
    from imagegen_pipeline.prompt_csv import VALID_COLUMNS, PromptRow

    fields = {"line", *PromptRow.model_fields, *PromptRow.model_computed_fields}
    assert set(VALID_COLUMNS) == fields and len(VALID_COLUMNS) == len(fields)


def test_valid_table_columns_and_types(tmp_path):
    path = write(tmp_path, "prompt,seed,width,height\na cat,3,512,\n")
    valid = read_prompt_csv(path).valid

    assert list(valid.columns) == [
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
        "lora",  # LoRA adapters, absolute paths with scales (tests/lora/test_lora.py)
        "control_image",  # ControlNet inputs (tests/control/test_control.py)
        "control_type",
        "control_scale",
        "candidates",  # best-of-N (tests/test_best_of_n.py)
        "select",
        "scorer",
        "min_score",
        "prompt_truncated_by_encoders",
    ]
    assert {str(valid[column].dtype) for column in ("seed", "width", "height")} == {"Int64"}
    assert valid["height"].isna().all()


def test_prompts_longer_than_clip_reads_are_accepted_and_flagged(tmp_path):
    # "cat" is one CLIP token: 75 of them plus the start and end tokens fill the 77 exactly.
    assert count_clip_tokens("a cat") == 4
    fits, too_long, old_cap = "cat " * 75, "cat " * 76, "a lighthouse in a storm " * 110
    path = write(tmp_path, f"prompt_id,prompt\nfits,{fits}\nlong,{too_long}\nold,{old_cap}\n")
    table = read_prompt_csv(path)

    assert len(old_cap) > 2000
    assert table.rejected_rows == 0
    flags = table.valid.set_index("prompt_id")["prompt_truncated_by_encoders"].to_dict()
    assert flags == {"fits": False, "long": True, "old": True}


def test_prompts_above_the_hard_cap_are_rejected_naming_the_cap(tmp_path):
    huge = "x" * (MAX_PROMPT_CHARS + 1)
    path = write(tmp_path, f"prompt\nfine prompt\n{huge}\n")
    problem = read_prompt_csv(path).rejected.iloc[0]

    assert (problem["line"], problem["field"]) == (3, "prompt")
    assert f"longer than {MAX_PROMPT_CHARS} characters" in problem["reason"]


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_semicolon_and_tab_separated_files_are_read(tmp_path, delimiter):
    path = write(
        tmp_path,
        "prompt;style;seed\na cat, sitting;anime;3\nno seed;none;x\n".replace(";", delimiter),
    )
    table = read_prompt_csv(path)

    row = table.valid.iloc[0]
    assert (row["prompt"], row["style"], row["seed"]) == ("a cat, sitting", "anime", 3)
    assert list(table.rejected["line"]) == [3]
    assert "seed must be an integer, got 'x'" in table.rejected["reason"].iloc[0]


def test_semicolon_file_with_unknown_columns_is_refused_clearly(tmp_path):
    path = write(tmp_path, "prompt;colour\na cat;red\n")
    with pytest.raises(PromptFileError, match=r"set\.csv: looks ';'-separated"):
        read_prompt_csv(path)


def test_rows_are_reported_on_the_line_where_they_start(tmp_path):
    path = write(
        tmp_path,
        "prompt_id,prompt,seed\n"  # line 1
        'multi,"a cat\non a mat\n\nat night",1\n'  # lines 2-5, valid
        "\n"  # line 6, blank
        "bad,a dog,x\n"  # line 7
        'worse,"a bird\nin flight",y\n'  # lines 8-9
        "after,a fish,z\n",  # line 10
    )
    table = read_prompt_csv(path)

    assert list(table.valid["line"]) == [2]
    assert table.valid["prompt"].iloc[0] == "a cat\non a mat\n\nat night"
    assert list(table.rejected["line"]) == [7, 8, 10]


def test_importing_the_reader_does_not_import_open_clip():
    code = "import sys, imagegen_pipeline.prompt_csv; assert 'open_clip' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_prompt_column_fails_with_one_clear_message(tmp_path):
    path = write(tmp_path, "text,style\nhello,none\n")
    with pytest.raises(PromptFileError, match=r"set\.csv: missing required column 'prompt'"):
        read_prompt_csv(path)


def test_non_utf8_file_fails_clearly(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match=r"latin1\.csv: not UTF-8"):
        read_prompt_csv(path)


def test_non_csv_files_fail_clearly(tmp_path):
    with pytest.raises(PromptFileError, match="not a CSV file"):
        read_prompt_csv(write(tmp_path, "prompt\nhello\n", name="prompts.xlsx"))
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"prompt\n\x00\x01\x02")
    with pytest.raises(PromptFileError, match="binary data"):
        read_prompt_csv(binary)


def test_file_without_any_valid_row_fails_and_keeps_the_rejections(tmp_path):
    path = write(tmp_path, "prompt,seed\n,1\nhello,notanumber\n")
    with pytest.raises(PromptFileError, match="no valid prompt row") as error:
        read_prompt_csv(path)
    assert sorted(error.value.rejected["line"]) == [2, 3]


STEMS = [
    "cats",
    "set-1.v2_x",
    "My Set (v2)",
    "a,b",
    "a|b",
    "a b",
    "a_b",
    "çà",
    "éè",
    "中文",
    "١٢",
    "नमस्ते",
    "..",
    "...hidden",
    "a...b",
    "x" * 300,
    "x" * 299 + "y",
    "é" * 300,
    "tab\there",
    "new\nline",
    "🙂🙂",
]


def test_prompt_set_names_are_distinct_readable_and_safe(tmp_path):
    names = [prompt_set_name(Path(f"{stem}.csv")) for stem in STEMS]
    assert len(set(names)) == len(STEMS), list(zip(STEMS, names, strict=True))
    # Names that were safe as they were stay as they were.
    for stem in ("cats", "set-1.v2_x", "çà", "éè", "中文", "١٢", "नमस्ते"):
        assert prompt_set_name(Path(f"{stem}.csv")) == stem
    # Changed or cut names keep what was readable and end in a hash.
    assert re.fullmatch(r"My_Set__v2_-[0-9a-f]{8}", prompt_set_name(Path("My Set (v2).csv")))
    assert prompt_set_name(Path("x" * 300 + ".csv")).startswith("x" * 80)
    for name in names:
        assert len(name.encode()) <= MAX_SET_NAME_BYTES and not name.startswith(".")
        assert "|" not in name and "..." not in name and name not in (".", "..")
        raise_error_on_invalid_partition_key_substring([name])
        dg.MultiPartitionKey({"prompt_set": name, "backend": "sdxl_turbo"})
        # A temporary Parquet file of the longest kind the storage writes.
        temp = tmp_path / name / f".{name}.parquet.{'0' * 8}.tmp"
        temp.parent.mkdir()
        temp.write_bytes(b"")
    # One name in any Unicode normal form (macOS file names come decomposed).
    decomposed = unicodedata.normalize("NFD", "çà")
    assert prompt_set_name(Path(f"{decomposed}.csv")) == "çà"


def test_files_mapping_to_one_set_are_refused_by_name(tmp_path):
    for name in ("x.csv", "x.CSV", "Y.csv", "y.csv", "ok.csv", "notes.txt"):
        (tmp_path / name).write_text("prompt\nhello\n")
    found = find_prompt_csvs(tmp_path)
    assert found.files == {"ok": tmp_path / "ok.csv"}
    assert sorted(found.problems) == ["Y", "x"]
    for name, files in (("x", ("x.csv", "x.CSV")), ("Y", ("Y.csv", "y.csv"))):
        message = found.problems[name]
        assert all(str(tmp_path / file) in message for file in files), message


def test_sidecar_defaults_apply_to_rows_and_rows_override_them(tmp_path):
    """``<set>.toml`` beside the CSV gives every row its keys; a row's own cell wins."""
    path = write(tmp_path, "prompt_id,prompt,style,num_images\na,a cat,,\nb,a dog,anime,3\n")
    (tmp_path / "set.toml").write_text(
        'style = "cinematic"\nnum_images = 2\nbackends = ["sdxl_turbo"]\n', encoding="utf-8"
    )
    rows = read_prompt_csv(path).valid.set_index("prompt_id")
    assert rows.loc["a", "style"] == "cinematic" and rows.loc["a", "num_images"] == 2
    assert rows.loc["b", "style"] == "anime" and rows.loc["b", "num_images"] == 3
    assert list(rows.loc["a", "backends"]) == ["sdxl_turbo"]


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        ('styel = "anime"\n', "unknown key 'styel'"),
        ('prompt_id = "x"\n', "unknown key 'prompt_id'"),
        ('style = "watercolor"\n', "set.toml, style: unknown style 'watercolor'"),
        ("num_images = 99\n", "set.toml, num_images: num_images must be between 1 and 16"),
        ("style = \n", "not a readable TOML file"),
        ("[flux_schnel]\nsteps = 2\n", "[flux_schnel] is not a backend"),
        ("[sdxl_turbo]\nsteps = 2\n", "[sdxl_turbo]: setting(s) steps cannot be set per"),
    ],
)
def test_a_bad_sidecar_names_its_file_and_key(tmp_path, sidecar, message):
    path = write(tmp_path, "prompt\na cat\n")
    (tmp_path / "set.toml").write_text(sidecar, encoding="utf-8")
    with pytest.raises(PromptFileError, match=re.escape(message)):
        read_prompt_csv(path)
