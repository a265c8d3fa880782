"""Folders written by Hugging Face `datasets` (`Dataset.save_to_disk`), read with pyarrow alone.

Such a folder holds `state.json`, whose `_data_files` lists the Arrow files in order, and those
files in Arrow's IPC *stream* format (what `datasets` writes); `save_to_disk` flattens any
selection or shuffle first, so the files' rows are the dataset's rows in order. A
`DatasetDict.save_to_disk` folder (`dataset_dict.json` naming its splits, one folder each) is
refused with the split folders to give instead: which split is training data is the user's call.
The `datasets` package is never imported: it is a large dependency for reading a few Arrow files.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
SPLITS_FILE = "dataset_dict.json"


def is_arrow_folder(path: Path) -> bool:
    return path.is_dir() and ((path / STATE_FILE).is_file() or (path / SPLITS_FILE).is_file())


def arrow_records(path: Path, error: type[Exception]) -> Iterator[dict[str, Any]]:
    """The folder's rows as dicts, in order; `error` (the caller's DataError) names the folder."""
    if (path / SPLITS_FILE).is_file() and not (path / STATE_FILE).is_file():
        splits = json.loads((path / SPLITS_FILE).read_text(encoding="utf-8")).get("splits", [])
        raise error(f"{path}: a DatasetDict folder with splits {', '.join(splits)}; give one split's folder, "
                    f"e.g. {path / (splits[0] if splits else 'train')}")
    try:
        import pyarrow.ipc as ipc
    except ImportError:
        raise error(f"{path}: reading a `datasets` folder needs pyarrow; install it with "
                    "`pip install velotune[data]`") from None
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    files = [entry.get("filename") for entry in state.get("_data_files", [])]
    if not files or not all(isinstance(name, str) for name in files):
        raise error(f"{path / STATE_FILE}: no '_data_files' list of Arrow files")
    for name in files:
        shard = path / name
        if not shard.is_file():
            raise error(f"{path}: {STATE_FILE} lists {name}, which is not in the folder")
        with ipc.open_stream(shard) as reader:
            for batch in reader:
                yield from batch.to_pylist()
