"""The data keys are checked like every other key: the key, the file and line (an entry of a list
its own line), a did-you-mean, and settings that cannot go together refused before any work."""
from __future__ import annotations

import pytest

from velotune.train.config import TrainConfig, TrainConfigError, check_values, load_config


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_dataset_lists_resolve_each_path_from_the_config_folder(tmp_path):
    folder = tmp_path / "project"
    (folder / "data" / "saved").mkdir(parents=True)
    (folder / "data" / "saved" / "state.json").write_text("{}")
    (folder / "data" / "a.jsonl").write_text("{}\n")
    config = load_config(write(folder / "run.yaml", "dataset:\n  - data/a.jsonl\n  - {path: data/saved, weight: 2}\n"
                                                    "  - chatterbot:ai\neval_dataset: [{path: data/a.jsonl}]\n"))
    assert config.dataset == [str(folder / "data" / "a.jsonl"), {"path": str(folder / "data" / "saved"), "weight": 2},
                              "chatterbot:ai"]
    assert config.eval_dataset == [{"path": str(folder / "data" / "a.jsonl")}]


@pytest.mark.parametrize("text, message", [
    ("dataset:\n  - chatterbot\n  - {path: chatterbot:ai, wieght: 2}\n",
     r"run.yaml line 3: key 'dataset': entry 2 has unknown key 'wieght' \(did you mean 'weight'\?\)"),
    ("dataset:\n  - {path: chatterbot, weight: -1}\n", "run.yaml line 2: key 'dataset': entry 1 .chatterbot.: 'weight' "
                                                      "must be a positive number, got -1"),
    ("dataset:\n  - data/missing.jsonl\n", "run.yaml line 2: key 'dataset': no file 'data/missing.jsonl'"),
    ("eval_dataset: []\n", "key 'eval_dataset': the list is empty"),
    ("column_template: 'Q: {question}'\n", "run.yaml line 1: key 'column_template' needs output_column"),
    ("output_column: answer\n", "run.yaml line 1: key 'output_column' is the answer column of column_template, "
                                "which is not set"),
    ("column_template: 'Q: {question'\noutput_column: a\n", "key 'column_template' is not a valid template"),
    ("column_template: '{question}'\noutput_column: a\ndataset_format: alpaca\n",
     "run.yaml line 3: key 'dataset_format' is replaced by column_template"),
    ("column_template: {question}\n", "YAML reads an unquoted .* as a mapping: quote the text"),
    ("dataset_format: text\nsystem_prompt: Be brief.\n", "key 'system_prompt' applies to conversations"),
    ("dialogue_extension: 0\n", "key 'dialogue_extension' must be at least 1"),
    ("dialogue_extnsion: 2\n", "did you mean 'dialogue_extension'"),
    ("transforms: [clean]\n", r"key 'transforms' entries are 'module:function'; 'clean' is not"),
    ("profile_steps: [5, 2]\n", r"key 'profile_steps' must be \[first, last\]"),
    ("profile_steps: [0, 2]\n", r"key 'profile_steps' must be \[first, last\]"),
    ("profile_steps: [2, 30]\nmax_steps: 10\n", "key 'profile_steps' ends after the run's last step .max_steps 10."),
    ("profile_steps: 3\n", "key 'profile_steps' must be a list of integers"),
    ("method: dpo\ndialogue_extension: 2\n", "key 'dialogue_extension' does not apply to method dpo .* a transform "
                                             "can reshape rows"),
])
def test_bad_data_settings_name_the_key_and_line(tmp_path, text, message):
    with pytest.raises(TrainConfigError, match=message):
        load_config(write(tmp_path / "run.yaml", text))


def test_command_line_values_with_braces_stay_text():
    config = load_config(None, ["--column_template={question} [[({topic})]]", "--output_column=answer",
                                "--dataset=[chatterbot:ai, {path: chatterbot, weight: 3}]", "--profile_steps=[2,4]"])
    assert config.column_template == "{question} [[({topic})]]"
    assert config.dataset == ["chatterbot:ai", {"path": "chatterbot", "weight": 3}] and config.profile_steps == [2, 4]
    check_values(TrainConfig(transforms=["pkg.clean:strip"], dialogue_extension=4, system_prompt="x"), "run.yaml")
