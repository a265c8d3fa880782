"""The data keys through the command line, on real chatterbot dialogues and on a CSV (made from
them) with optional columns: column_template, output_column, system_prompt, dialogue_extension,
mixed `dataset` and `eval_dataset` lists, a `datasets` folder, transforms, profile_steps."""
from __future__ import annotations

import csv
import json
import re
import textwrap

import pytest
from tests.cli.cli_helpers import write_config

from velotune.cli import main
from velotune.data import DataError, load_chatterbot
from velotune.train.config import TrainConfig
from velotune.train.sources import read_sources

END = "<|im_end|>"
TEMPLATE = "{question}[[ (topic: {topic})]][[ Note: {note}.]]"
SYSTEM = "You are VeloBot."


@pytest.fixture(scope="module")
def exchanges():
    """(question, answer, topic, note) from the corpus; topic empty on every third row, note on every fourth."""
    rows = []
    for i, sample in enumerate(load_chatterbot(categories=["greetings", "ai"])):
        question, answer = sample.messages[0]["content"], sample.messages[1]["content"]
        rows.append({"question": question, "answer": answer, "topic": "" if i % 3 == 2 else sample.metadata["file"],
                     "note": f"{len(answer.split())} words" if i % 4 == 1 else ""})
    return rows


@pytest.fixture
def chatterbot_csv(exchanges, tmp_path):
    path = tmp_path / "exchanges.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "answer", "topic", "note"])
        writer.writeheader()
        writer.writerows(exchanges)
    return path


def by_hand(row: dict) -> str:
    """The conversation as the tiny model's ChatML writes it, the template applied by hand."""
    user = row["question"] + (f" (topic: {row['topic']})" if row["topic"] else "") + \
        (f" Note: {row['note']}." if row["note"] else "")
    return (f"<|im_start|>system\n{SYSTEM}{END}\n<|im_start|>user\n{user}{END}\n"
            f"<|im_start|>assistant\n{row['answer']}{END}\n")


def test_column_template_with_optional_parts_and_system_prompt(tiny_chat_model, chatterbot_csv, exchanges, tmp_path,
                                                               capsys):
    config = write_config(tmp_path / "run.yaml", model=str(tiny_chat_model), dataset=str(chatterbot_csv),
                          column_template=TEMPLATE, output_column="answer", system_prompt=SYSTEM, eval_split=0.0,
                          max_seq_length=512)
    assert main(["data", str(config), "--rows", "6"]) == 0
    out = capsys.readouterr().out
    blocks = re.split(r"^── row \d+: .*$\n", out.split("\nstatistics")[0], flags=re.MULTILINE)[1:]
    assert len(blocks) == 6 and any(not row["topic"] for row in exchanges[:6]) and any(r["note"] for r in exchanges[:6])
    for block, row in zip(blocks, exchanges):
        assert block.replace("«", "").replace("»", "").rstrip("\n") == by_hand(row).rstrip("\n")
        assert re.findall("«(.*?)»", block, re.DOTALL) == [row["answer"] + END]
    assert f"rows: {len(exchanges)} read" in out


def test_a_template_typo_fails_with_the_real_columns(tiny_chat_model, chatterbot_csv, tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", model=str(tiny_chat_model), dataset=str(chatterbot_csv),
                          column_template="{questoin}[[ ({topic})]]", output_column="answer")
    assert main(["data", str(config)]) == 2
    assert (f"velotune data: error: {chatterbot_csv}: template uses column 'questoin', which the dataset lacks; "
            "available columns: answer, note, question, topic") in capsys.readouterr().err
    assert main(["train", str(config), "--column_template={question}", "--output_column=answr", "--no-progress",
                 f"--output_dir={tmp_path / 'run'}", f"--model={tmp_path / 'no-such-model'}"]) == 2
    err = capsys.readouterr().err                     # the data fails first: no model was looked for
    assert "template uses column 'answr', which the dataset lacks" in err and "no-such-model" not in err


def test_dialogue_extension_equals_the_rows_joined_by_hand():
    corpus = {sample.where: sample for sample in load_chatterbot(categories=["greetings"])}
    [source], separate_eval = read_sources(TrainConfig(dataset="chatterbot:greetings", dialogue_extension=3,
                                                       eval_split=0.0, system_prompt=SYSTEM))
    samples = source.train
    assert source.eval == separate_eval == [] and [len(s.where.split(" + ")) for s in samples] == [3] * (len(corpus) // 3) + \
        ([len(corpus) % 3] if len(corpus) % 3 else [])
    joined = [where for sample in samples for where in sample.where.split(" + ")]
    assert sorted(joined) == sorted(corpus)                              # every dialogue used once
    for sample in samples:
        by_hand = [{"role": "system", "content": SYSTEM}]
        for where in sample.where.split(" + "):
            by_hand += corpus[where].messages
        assert sample.messages == by_hand
    [again], _ = read_sources(TrainConfig(dataset="chatterbot:greetings", dialogue_extension=3, eval_split=0.0, seed=1))
    assert [s.where for s in again.train] != [s.where for s in samples]      # seeded: another seed, other groups


SYNONYMS = '''
SWAPS = {"Hello": "Hi there", "Hi": "Hey"}

def synonyms(row):
    """Back-translation's cheap cousin: a variant of each dialogue with its first word swapped."""
    first = row["messages"][0]["content"]
    word = first.split()[0].strip(",!?") if first.split() else ""
    if word not in SWAPS:
        return row
    variant = [dict(m) for m in row["messages"]]
    variant[0]["content"] = first.replace(word, SWAPS[word], 1)
    return [row, {**row, "messages": variant}]
'''


def test_chatterbot_run_with_mixing_extension_transforms_eval_list_and_profiler(tiny_chat_model, tmp_path, capsys,
                                                                                  monkeypatch):
    (tmp_path / "augment.py").write_text(textwrap.dedent(SYNONYMS), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("VELOTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml", model=str(tiny_chat_model),
        dataset=["chatterbot:greetings", {"path": "chatterbot:ai", "weight": 0.5}],
        eval_dataset=[{"path": "chatterbot:botprofile"}], dialogue_extension=2, system_prompt=SYSTEM,
        transforms=["augment:synonyms"], profile_steps=[2, 3], max_steps=3, micro_batch_size=2, max_seq_length=256,
        output_dir=str(out), report=False)
    assert main(["train", str(config), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    greetings = re.search(r"chatterbot:greetings: (\d+) rows, (\d+) examples x weight 1 = (\d+) per epoch", printed)
    ai = re.search(r"chatterbot:ai: (\d+) rows, (\d+) examples x weight 0.5 = (\d+) per epoch", printed)
    assert greetings and ai and int(greetings[2]) == int(greetings[3]) and int(ai[3]) == round(int(ai[2]) / 2)
    swapped = re.search(r"chatterbot:greetings: transforms: (\d+) rows in, (\d+) out, 0 dropped", printed)
    assert swapped and int(swapped[2]) > int(swapped[1])                 # the variants were added
    trace = out / "profile" / "steps_2-3.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {event.get("name", "") for event in events}
    assert {"velotune step 2", "velotune step 3"} <= names and any(name.startswith("aten::") for name in names)
    assert f"profile of steps 2-3: {trace}" in printed and "top operations by self CPU time:" in printed
    assert "no GPU in this run: device idle time not measured" in printed


def test_csv_and_datasets_folder_mixed_with_a_template(tiny_chat_model, chatterbot_csv, exchanges, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(exchanges[:10]).save_to_disk(folder)
    config = write_config(
        tmp_path / "run.yaml", model=str(tiny_chat_model), dataset=[str(chatterbot_csv), {"path": "saved", "weight": 2}],
        column_template=TEMPLATE, output_column="answer", system_prompt=SYSTEM, eval_split=0.1, max_steps=2,
        micro_batch_size=2, max_seq_length=256, output_dir=str(tmp_path / "run"), report=False)
    assert main(["train", str(config), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"{folder}: 10 rows, 9 examples x weight 2 = 18 per epoch", printed)
    assert re.search(rf"{chatterbot_csv}: {len(exchanges)} rows, {len(exchanges) - round(0.1 * len(exchanges))} "
                     r"examples x weight 1", printed)


def test_settings_for_conversations_on_raw_text_are_refused(tmp_path):
    text = tmp_path / "book.jsonl"
    text.write_text(json.dumps({"text": "Call me Ishmael."}) + "\n" + json.dumps({"text": "Some years ago."}) + "\n")
    with pytest.raises(DataError, match=f"{text}: system_prompt applies to conversations, but the rows are raw text"):
        read_sources(TrainConfig(dataset=str(text), system_prompt=SYSTEM, eval_split=0.0))
    with pytest.raises(DataError, match=f"{text}: dialogue_extension joins conversations, but the rows are raw text"):
        read_sources(TrainConfig(dataset=str(text), dialogue_extension=2, eval_split=0.0))
