"""Folders written by Hugging Face `datasets` (`save_to_disk`) are read with pyarrow alone, row for
row equal to what `datasets` wrote; a DatasetDict folder names its splits."""
from __future__ import annotations

import sys

import pytest

from velotune.data import DataError, read_rows

datasets = pytest.importorskip("datasets")

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 3 else f"carry {i}", "output": str(2 * i + 1),
         "score": i / 4, "tags": [f"t{i}"] * (i % 3)} for i in range(11)]


def test_saved_dataset_reads_back_equal_in_order(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).shuffle(seed=3).select(range(9)).save_to_disk(folder, num_shards=3)
    expected = datasets.load_from_disk(folder).to_list()
    rows = read_rows(folder)
    assert [row.data for row in rows] == expected
    assert rows[4].where == f"{folder} row 4"
    assert expected != ROWS[:9]          # the shuffled selection, in its order


def test_the_library_never_imports_datasets(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(folder)
    code = ("import sys; from velotune.data import read_rows; rows = read_rows(sys.argv[1]); "
            "assert 'datasets' not in sys.modules, 'datasets imported'; print(len(rows))")
    import subprocess

    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(ROWS))


def test_a_dataset_dict_folder_names_its_splits(tmp_path):
    folder = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])}
                         ).save_to_disk(folder)
    with pytest.raises(DataError, match=rf"a DatasetDict folder with splits train, test; give one split's folder, "
                                        rf"e\.g\. {folder / 'train'}"):
        read_rows(folder)
    assert len(read_rows(folder / "test")) == 2


def test_a_plain_folder_is_refused_clearly(tmp_path):
    with pytest.raises(DataError, match="a folder, but not one written by `datasets`' save_to_disk"):
        read_rows(tmp_path)
