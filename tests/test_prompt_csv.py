"""Prompt CSV validation: every rejection reason, and whole-file failures."""

from pathlib import Path

import pytest

from imagegen_pipeline.prompt_csv import (
    PromptFileError,
    derived_prompt_id,
    prompt_set_name,
    read_prompt_csv,
)


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
    assert list(row["backends"]) == ["flux_schnell", "sdxl_turbo", "gemini"]


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


def test_prompt_set_names_are_safe():
    assert prompt_set_name(Path("prompts/My Set (v2).csv")) == "My_Set__v2_"
    assert prompt_set_name(Path("prompts/..csv")) == "prompts"
