"""Reading data files into records (one dict each), whatever their shape: `lorakit.data.formats` then
tells the shapes apart.

- `.jsonl`: one JSON object a line (blank lines skipped); records are named by line.
- `.json`: a JSON list of objects; records are named by their 1-based position.
- `.csv`: a header row, then one record a row (every value a string); named by line.
- `.parquet`: a table (pyarrow, the `cli` extra); nested columns (message lists) come as lists of
  dicts; named by 1-based position.
- a folder: a Hugging Face `datasets` folder written by `save_to_disk` (the `datasets` extra; local
  files only): a `Dataset`, or a `DatasetDict`'s `train` split (or its only split).
- `.txt`: the LoRA repo's E2E lines `<context>||<completion>`, as `prompt`/`completion`/`group`
  records.
- `"e2e"`, `"e2e-dev"`: the bundled E2E samples (`BUNDLED_DATASETS`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.e2e.text import E2E_SEPARATOR
from lorakit.errors import DataError
from lorakit.extras import require

__all__ = ["BUNDLED_DATASETS", "BUNDLE_DIR", "SOURCES", "Records", "read_records", "resolve_source"]

BUNDLE_DIR = Path(__file__).resolve().parent / "bundled"
"""The folder of the data files shipped with lorakit (the E2E samples and their license)."""
BUNDLED_DATASETS: dict[str, str] = {
    "e2e": "e2e_train_sample.jsonl",
    "e2e-dev": "e2e_dev_sample.jsonl",
}
"""Bundled dataset name -> its file in `BUNDLE_DIR`; `load_examples` accepts the names as sources."""

SOURCES = (
    ".jsonl, .json, .csv, .parquet, a Hugging Face datasets folder (save_to_disk), "
    ".txt (E2E LoRA lines '<context>||<completion>') or a bundled name (" + ", ".join(BUNDLED_DATASETS) + ")"
)
"""The accepted sources, as error messages list them."""

_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class Records:
    """The records of one source.

    Attributes:
        path: The file or folder read.
        columns: A table's column names (CSV, parquet, `datasets`), the same for every record;
            None for JSON, whose records may differ.
        rows: `(where, record)` pairs in file order: `where` names the record in messages
            (`line 3`, `record 3`), `record` is a dict (or whatever a JSON line held).
    """

    path: Path
    columns: list[str] | None
    rows: Iterator[tuple[str, Any]]


def resolve_source(source: str | os.PathLike) -> Path:
    """The file or folder a data source names (a path or a bundled dataset's name), checked to exist.

    Args:
        source: A file path (`~` is expanded), a `datasets` folder, or a name of `BUNDLED_DATASETS`.

    Returns:
        The path.

    Raises:
        DataError: no such file, a folder that is not a `datasets` folder, or a bundled file missing
            from the installation.
    """
    text = os.fspath(source)
    if text in BUNDLED_DATASETS:
        path = BUNDLE_DIR / BUNDLED_DATASETS[text]
        if not path.is_file():
            raise DataError(f"bundled dataset {text!r} is missing from the installation ({path}); reinstall lorakit")
        return path
    path = Path(text).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in _DATASETS_MARKERS):
            return path
        raise DataError(
            f"data folder {path} is not a Hugging Face datasets folder (no {' / '.join(_DATASETS_MARKERS)}; "
            f"write one with Dataset.save_to_disk). Accepted: {SOURCES}."
        )
    if not path.is_file():
        raise DataError(f"data file not found: {path}. Accepted: {SOURCES}.")
    return path


def read_records(source: str | os.PathLike) -> Records:
    """The records of a data source, read lazily in file order.

    Args:
        source: See `resolve_source`.

    Returns:
        The records (a table's columns are read at once, so a missing column is reported before
        any record).

    Raises:
        DataError: an unknown suffix, invalid JSON (file and line named), a CSV row shorter than its
            header, or a parquet file or `datasets` folder that cannot be read.
        MissingExtraError: parquet without pyarrow (the `cli` extra), a folder without `datasets`.
    """
    path = resolve_source(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_datasets_folder(path)
    if suffix == ".jsonl":
        return Records(path, None, _read_jsonl(path))
    if suffix == ".json":
        return Records(path, None, _read_json(path))
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".txt":
        return Records(path, None, _read_lora_e2e(path))
    raise DataError(f"{path}: unknown data format {suffix or '(no suffix)'!r}. Accepted: {SOURCES}.")


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from exc


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    raw = path.read_text(encoding="utf-8")
    if not raw.strip():
        return
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(records, list):
        raise DataError(f"{path}: a .json data file must hold a list of records, found {type(records).__name__}")
    # A JSON list has no line per record; report the record's 1-based position instead.
    for number, record in enumerate(records, start=1):
        yield f"record {number}", record


def _read_csv(path: Path) -> Records:
    handle = path.open(encoding="utf-8-sig", newline="")
    reader = csv.DictReader(handle)
    try:
        columns = [name.strip() for name in reader.fieldnames or []]
    except csv.Error as exc:
        handle.close()
        raise DataError(f"{path}: not a readable CSV file ({exc})") from exc
    reader.fieldnames = columns

    def rows() -> Iterator[tuple[str, Any]]:
        with handle:
            for row in reader:
                where = f"line {reader.line_num}"
                if any(value is None for value in row.values()):
                    raise DataError(f"{path}, {where}: the row has fewer fields than the header {columns}")
                yield where, row

    if not columns:
        handle.close()
        return Records(path, [], iter(()))
    return Records(path, columns, rows())


def _read_parquet(path: Path) -> Records:
    pq = require("pyarrow.parquet", "cli", f"reading {path.name} (.parquet)")
    try:
        table = pq.ParquetFile(path)
        columns = list(table.schema_arrow.names)
    except Exception as exc:  # pyarrow's ArrowInvalid, OSError, ...: the file is not a parquet table
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc

    def rows() -> Iterator[tuple[str, Any]]:
        number = 0
        for batch in table.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield f"record {number}", record

    return Records(path, columns, rows())


def _read_datasets_folder(path: Path) -> Records:
    datasets = require("datasets", "datasets", f"reading the Hugging Face datasets folder {path}")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # FileNotFoundError, a folder of another datasets version, ...
        raise DataError(f"{path}: not a readable datasets folder ({type(exc).__name__}: {exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        else:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {splits}); save the split to read")
    dataset = loaded

    def rows() -> Iterator[tuple[str, Any]]:
        for number, record in enumerate(dataset, start=1):
            yield f"record {number}", record

    return Records(path, list(dataset.column_names), rows())


def _read_lora_e2e(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if "||" not in line:
                raise DataError(
                    f"{path}, line {number}: a .txt data file must use the LoRA E2E format "
                    "'<context>||<completion>' and this line has no '||'"
                )
            context, completion = line.split("||", 1)
            context = context.strip()
            yield (
                f"line {number}",
                {
                    "prompt": context + E2E_SEPARATOR,
                    "completion": " " + completion.strip(),
                    "group": context,
                },
            )
