"""Prompt sets: built-ins, prompt files (txt, MLPerf-style TSV, I2P CSV) and their errors."""

from __future__ import annotations

import dataclasses

import pytest

from harness.errors import DiffbenchError
from harness.mini.world import SHAPES
from harness.prompts import PROMPTS, Prompt, PromptSet, load_prompts, register_prompt_set
from harness.registry import UnknownNameError

MLPERF_TSV = ("id\tcaption\n"
              "203564\tA bicycle replica with a clock as the front wheel.\n"
              "322141\tA room with blue walls and a white sink and door.\n"
              "16977\tA car that seems to be parked illegally behind a legally parked car\n")

I2P_CSV = ("prompt,categories,hard,inappropriate_percentage,nudity_percentage,lexica_url,"
           "sd_safety_percentage,prompt_toxicity,sd_seed,sd_guidance_scale,sd_image_width,"
           "sd_image_height\n"
           "\"a painting, of a  storm\",violence,1,50.0,0.0,https://x,10.0,0.1,2539888290,7,512,512\n"
           "a quiet street,harassment,0,10.0,0.0,https://y,0.0,0.05,123,12.5,512,512\n")


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_registered_sets_and_default_shapes():
    assert {"shapes", "general"} <= set(PROMPTS.names())
    shapes = load_prompts("shapes", None)
    assert len(shapes) == len(set(shapes.texts)) == 5 * 8 * 2 * 7
    assert all(p.seed is None and p.guidance is None for p in shapes.prompts)
    assert shapes.texts == load_prompts("shapes", None).texts  # deterministic order
    assert "a large red circle on a blue background" in shapes.texts
    assert "a small green star on an orange background" in shapes.texts


def test_shapes_first_prompts_are_diverse():
    first = load_prompts("shapes", 20).texts
    assert len(first) == 20
    assert {t.split()[3] for t in first} == set(SHAPES)
    assert {t.split()[1] for t in first} == {"small", "large"}


def test_general_set_is_everyday_prompts():
    general = load_prompts("general", None)
    assert 20 <= len(general) <= 30 and len(set(general.texts)) == len(general)
    assert general.source


def test_misspelt_builtin_suggests_the_name():
    with pytest.raises(UnknownNameError, match="did you mean 'shapes'"):
        load_prompts("shapse", 4)


def test_too_many_prompts_names_both_numbers():
    with pytest.raises(DiffbenchError, match="has 24 prompts, but 100 were asked for"):
        load_prompts("general", 100)


def test_register_prompt_set_is_the_only_name_definition():
    @register_prompt_set("test-two")
    def two():
        """Two prompts for this test."""
        return ["one", "two"]

    try:
        got = load_prompts("test-two", None)
        want = PromptSet("test-two", (Prompt("one"), Prompt("two")), "Two prompts for this test.")
        assert got == want
        with pytest.raises(ValueError, match="already registered"):
            register_prompt_set("test-two")(lambda: ["other"])
    finally:
        PROMPTS._items.pop("test-two")


def test_txt_skips_blank_and_comment_lines(tmp_path):
    path = write(tmp_path, "p.txt", "# my prompts\n\na red fox\n  a blue whale  \n#skip\n")
    got = load_prompts(str(path), None)
    assert got.texts == ["a red fox", "a blue whale"]
    assert got.name == str(path) and "sha256" in got.source


def test_mlperf_tsv_reads_the_caption_column(tmp_path):
    got = load_prompts(str(write(tmp_path, "captions.tsv", MLPERF_TSV)), 2)
    assert got.texts == ["A bicycle replica with a clock as the front wheel.",
                         "A room with blue walls and a white sink and door."]
    assert all(p.seed is None for p in got.prompts)


@pytest.mark.parametrize("column", ["prompt", "text"])
def test_csv_accepts_prompt_or_text_column(tmp_path, column):
    path = write(tmp_path, "p.csv", f"n,{column}\n1,a cat\n2,\"a dog, running\"\n")
    got = load_prompts(str(path))
    assert got.texts == ["a cat", "a dog, running"]


def test_i2p_csv_keeps_seed_and_guidance_per_prompt(tmp_path):
    got = load_prompts(str(write(tmp_path, "i2p.csv", I2P_CSV)), None)
    assert got.prompts == (Prompt("a painting, of a storm", 2539888290, 7.0),
                           Prompt("a quiet street", 123, 12.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.prompts[0].seed = 1


def test_missing_caption_column_names_the_file(tmp_path):
    path = write(tmp_path, "bad.tsv", "id\tdescription\n1\ta cat\n")
    with pytest.raises(DiffbenchError, match=rf"{path}:1: no prompt column"):
        load_prompts(str(path), None)


def test_wrong_field_count_names_the_line(tmp_path):
    path = write(tmp_path, "bad.tsv", "id\tcaption\n1\ta cat\n\n2\ta dog\textra\n")
    with pytest.raises(DiffbenchError, match=rf"{path}:4: expected 2 fields.*found 3"):
        load_prompts(str(path), None)


@pytest.mark.parametrize("seed", ["abc", "-3", "1.5"])
def test_bad_i2p_seed_names_the_line(tmp_path, seed):
    path = write(tmp_path, "i2p.csv", I2P_CSV.replace("123", seed))
    with pytest.raises(DiffbenchError, match=rf"{path}:3: bad sd_seed"):
        load_prompts(str(path), None)


def test_empty_prompt_names_the_line(tmp_path):
    path = write(tmp_path, "p.csv", "id,caption\n1,a cat\n2,  \n")
    with pytest.raises(DiffbenchError, match=rf"{path}:3: empty prompt"):
        load_prompts(str(path), None)


def test_error_messages_are_one_line(tmp_path):
    path = write(tmp_path, "p.csv", "id,caption\n1,a cat\n2,a dog,extra\n")
    with pytest.raises(DiffbenchError) as info:
        load_prompts(str(path), None)
    assert "\n" not in str(info.value) and f"{path}:3:" in str(info.value)


@pytest.mark.parametrize("text, line, why", [
    ("id,caption\n1,\"a cat\nwith two lines\"\n2,b\n", 2, "runs over several lines"),
    ("id,caption\n1,a cat\n2,\"a dog\n3,a bird\n", 3, "bad quoting"),
    ("id,caption\n1,\"a\" cat\n", 2, "bad quoting"),
])
def test_quoting_mistakes_name_the_line_instead_of_merging_rows(tmp_path, text, line, why):
    path = write(tmp_path, "p.csv", text)
    with pytest.raises(DiffbenchError, match=rf"{path}:{line}: .*{why}"):
        load_prompts(str(path), None)


@pytest.mark.parametrize("name, data", [("p.txt", b"a cat\n\xff\xfe dog\n"),
                                        ("p.csv", b"caption\na cat\nd\xe9j\xe0 vu\n")])
def test_non_utf8_bytes_name_file_and_line(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DiffbenchError, match=rf"{path}:\d: not UTF-8 text \(byte 0x"):
        load_prompts(str(path), None)


def test_i2p_seed_beyond_what_torch_takes_names_the_line(tmp_path):
    path = write(tmp_path, "i2p.csv", I2P_CSV.replace("123", str(2**64)))
    with pytest.raises(DiffbenchError, match=rf"{path}:3: bad sd_seed .*18446744073709551615"):
        load_prompts(str(path), None)


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DiffbenchError, match="prompt file not found: .*nope.txt"):
        load_prompts(str(tmp_path / "nope.txt"), None)
    with pytest.raises(DiffbenchError, match="supported file types"):
        load_prompts(str(write(tmp_path, "p.json", "[]")), None)
    with pytest.raises(DiffbenchError, match="no prompts in"):
        load_prompts(str(write(tmp_path, "empty.txt", "# nothing\n")), None)


def test_red_and_not_red_world_sets_split_the_captions():
    red, other = load_prompts("shapes-red").texts, load_prompts("shapes-not-red").texts
    assert len(red) == 70 and all(t.split()[2] == "red" for t in red)
    assert all("red" not in t.split() for t in other) and not set(red) & set(other)
