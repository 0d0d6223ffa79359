import json
import os

import pytest

import utils


def test_templates_are_the_original_characters():
    with_input = utils.format_prompt("Add the numbers.", "2 and 3")
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "Add the numbers.\n\n### Input:\n2 and 3\n\n### Response:"
    )
    for empty in ("", None):
        assert utils.format_prompt("Name a color.", empty) == (
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:"
        )


def test_braces_in_text_are_not_format_fields():
    assert "{x}" in utils.format_prompt("Explain {x} in f-strings.", "{y}")


def test_jload_reads_json_and_json_lines(tmp_path):
    records = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert utils.jload(tmp_path / "list.json") == records
    assert utils.jload(tmp_path / "lines.jsonl") == records


def test_jload_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2"):
        utils.jload(path)


def test_jdump_replaces_atomically_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    utils.jdump([1], path)
    utils.jdump([1, 2], path)
    assert json.loads(path.read_text()) == [1, 2]
    assert os.listdir(tmp_path) == ["out.json"]
    (tmp_path / "plain.json").write_text("[]")
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777


def test_jdump_keeps_the_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "out.json"
    utils.jdump({"kept": True}, path)
    with pytest.raises(ValueError):
        utils.jdump({"circular": _circular()}, path)
    assert json.loads(path.read_text()) == {"kept": True}
    assert os.listdir(tmp_path) == ["out.json"]


def _circular():
    loop = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "nope", "no such directory"),
        (lambda tmp: "demo_output/tunedd", "no such local directory, and the Hugging Face hub"),
        (lambda tmp: tmp, "the directory has no config.json, no weights"),
    ],
)
def test_a_model_that_cannot_be_loaded_is_one_line(tmp_path, monkeypatch, make, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the hub
    with pytest.raises(utils.UsageError, match=message):
        utils.check_model_source(str(make(tmp_path)))


def test_a_complete_model_directory_passes_and_offline_means_no_hub(tiny_llama_dir, monkeypatch):
    utils.check_model_source(str(tiny_llama_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not utils.hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert not utils.hub_reachable()
