"""The local corpus: the data files a source list names, their first records, and what prep needs of a record.

prep and the start-up checks (pipeline/preflight.py) share these, so a bad corpus is refused at start-up with
the message prep would give, after reading only the head of each file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import pyarrow.parquet as pq

DATA_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HEAD_RECORDS = 16
"""Records read from the start of each file at start-up."""
SNIFF_CHARS = 1 << 16
"""Characters read from the start of a .txt or .json file at start-up."""
NEEDS_CHAT_TEMPLATE = ("chat `messages` records need a tokenizer with a chat template (set tokenizer.path to "
                       "one; a trained or SentencePiece .model tokenizer has none) or Alpaca "
                       "instruction/input/output records")


def data_files(sources) -> list[Path]:
    """Expand files and folders into the data files they hold, refusing what prep cannot read."""
    files = []
    for source in map(Path, sources):
        if not source.exists():
            raise FileNotFoundError(f"data.sources: {source} does not exist")
        found = sorted(p for p in source.rglob("*") if p.suffix in DATA_SUFFIXES) if source.is_dir() else [source]
        if not found:
            raise ValueError(f"data.sources: {source} holds no {'/'.join(DATA_SUFFIXES)} files")
        for path in found:
            if path.suffix not in DATA_SUFFIXES:
                raise ValueError(f"data.sources: {path} is not one of {', '.join(DATA_SUFFIXES)}")
        files += found
    if all(p.stat().st_size == 0 for p in files):
        raise ValueError(f"data.sources: {[str(p) for p in files]} are empty; the corpus has no text")
    kinds = {DATA_SUFFIXES[p.suffix] for p in files}
    if len(kinds) > 1:
        raise ValueError(f"data.sources: mixes {sorted(kinds)} files; give one kind per run")
    return files


def text_field_problem(columns: Iterable[str], text_field: str, where: str = "the corpus") -> str | None:
    """Why a text corpus with these columns (or a record with these fields) has no `data.text_field`."""
    if text_field in columns:
        return None
    return (f"data.text_field: {text_field!r} not in the columns of {where} {sorted(columns)}; set "
            f"data.text_field to the one that holds the documents")


def instruction_problem(record: dict, chat_template: bool | None, where: str = "data") -> str | None:
    """Why prep cannot render this Alpaca or chat `messages` record (chat_template None: not known, not checked)."""
    messages = record.get("messages")
    if messages:
        last = messages[-1] if isinstance(messages, list) else None
        role = last.get("role") if isinstance(last, dict) else None
        if role != "assistant":
            return f"{where}: a chat record must end with an assistant message, got {role!r}"
        return f"{where}: {NEEDS_CHAT_TEMPLATE}" if chat_template is False else None
    if "instruction" not in record or "output" not in record:
        return f"{where}: instruction records need instruction/output fields or messages; got {sorted(record)}"
    return None


def head_problem(path: Path, data, chat_template: bool | None) -> str | None:
    """What prep would refuse in the first records of one data file (a parquet file: in its schema).

    Raises OSError or ValueError when the file does not read as its suffix says."""
    if path.suffix == ".parquet":
        return columns_problem(pq.read_schema(path).names, data, chat_template, path)
    for number, record in head_records(path):
        if data.format == "text":
            problem = text_field_problem(record, data.text_field, f"{path}:{number}")
        else:
            problem = instruction_problem(record, chat_template, f"data.sources: {path}:{number}")
        if problem is not None:
            return problem
    return None


def columns_problem(columns: list[str], data, chat_template: bool | None, path: Path) -> str | None:
    """What prep would refuse in a table with these columns, whatever its rows hold."""
    if data.format == "text":
        return text_field_problem(columns, data.text_field, str(path))
    if "messages" in columns and not {"instruction", "output"} <= set(columns):
        return f"data.sources: {path}: {NEEDS_CHAT_TEMPLATE}" if chat_template is False else None
    return instruction_problem(dict.fromkeys(columns), chat_template, f"data.sources: {path}")


def head_records(path: Path, limit: int = HEAD_RECORDS) -> list[tuple[int, dict]]:
    """(line number, record) of the first records of a data file other than parquet, as prep's loader sees them.

    A .json file gives them only when it is JSON lines: a JSON array would have to be parsed whole."""
    with path.open(encoding="utf-8") as file:
        if path.suffix == ".txt":
            file.read(SNIFF_CHARS)  # UTF-8 or not; every record of a .txt is {"text": ...}
            return [(1, {"text": ""})]
        if path.suffix == ".jsonl":
            lines = list(islice(file, limit))
        else:  # the last line of a full sniff may be cut short
            head = file.read(SNIFF_CHARS)
            lines = head.splitlines()[:-1 if len(head) == SNIFF_CHARS else None][:limit]
        numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for number, line in numbered:
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"line {number} is not a JSON object")
        except ValueError:
            if path.suffix == ".json" and not records:  # not JSON lines: an array, or one object over many lines
                return []
            raise
        records.append((number, record))
    return records
