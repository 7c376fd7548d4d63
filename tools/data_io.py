"""Reading dataset rows one at a time, with their line numbers, from local files or the hub.

Local: JSONL (streamed line by line), JSON (an array, an object holding one, or JSON Lines
under a .json name), CSV/TSV (streamed), Parquet (streamed by record batch), or a directory
holding such files for a split (`train.jsonl`, `data/train-*.parquet`, ...). Hub: a dataset id,
read with `datasets.load_dataset(..., streaming=True)` when the hub is reachable.

Every row comes with its location: the 1-based line where it starts (JSONL, JSON, CSV) or its
1-based row number (Parquet, hub, several files). Undecodable bytes and malformed JSON raise
UserError naming the line.
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError
from .hub import hub_offline, hub_unreachable
from .workspace import get_workspace

JSONL_EXT = {".jsonl", ".ndjson"}
JSON_EXT = {".json"}
CSV_EXT = {".csv", ".tsv"}
PARQUET_EXT = {".parquet", ".pq"}
DATA_EXT = JSONL_EXT | JSON_EXT | CSV_EXT | PARQUET_EXT
COMPRESSED_EXT = {".gz", ".bz2", ".xz", ".zst", ".zip", ".tar"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
BOM = b"\xef\xbb\xbf"

Row = tuple[int, dict]  # (location, row)


@dataclass
class Source:
    """An opened dataset: what it is, and how to iterate it."""
    name: str                      # as the caller gave it
    kind: str                      # jsonl | json | csv | parquet | hub
    unit: str                      # "line" or "row": what locations count
    files: list[Path] = field(default_factory=list)
    split: str = "train"
    subset: str | None = None

    @property
    def path(self) -> Path | None:
        return self.files[0] if len(self.files) == 1 else None

    def rows(self, limit: int | None = None) -> Iterator[Row]:
        """Yield (location, row dict) in file order; at most `limit` rows."""
        it = self._hub_rows() if self.kind == "hub" else self._local_rows()
        n = 0
        for loc, row in it:
            if limit is not None and n >= limit:
                return
            n += 1
            yield loc, row

    def count_rows(self) -> int | None:
        """Total rows, counted cheaply where possible (None when unknown: hub streaming)."""
        if self.kind == "hub":
            return self._hub_count()
        total = 0
        for f in self.files:
            kind = _kind(f)
            if kind == "jsonl":
                with open(f, "rb") as fh:
                    total += sum(1 for line in fh if line.strip())
            elif kind == "parquet":
                import pyarrow.parquet as pq
                total += pq.ParquetFile(f).metadata.num_rows
            else:
                total += sum(1 for _ in _file_rows(f, kind))
        return total

    # -- local -----------------------------------------------------------------------------
    def _local_rows(self) -> Iterator[Row]:
        if len(self.files) == 1:
            yield from _file_rows(self.files[0], _kind(self.files[0]))
            return
        n = 0  # several files: number rows across them
        for f in self.files:
            for _, row in _file_rows(f, _kind(f)):
                n += 1
                yield n, row

    # -- hub -------------------------------------------------------------------------------
    def _hub_dataset(self):
        try:
            import datasets
        except ImportError as exc:  # pragma: no cover - train extra missing
            raise UserError("reading a hub dataset needs the `datasets` package.", field="dataset",
                            fix="pip install 'llm-fine-tuning[train]', or give a local file.") from exc
        try:
            return datasets.load_dataset(self.name, self.subset, split=self.split, streaming=True)
        except Exception as exc:  # noqa: BLE001 - every hub failure becomes a clear user error
            raise UserError(f"could not open hub dataset '{self.name}' (split '{self.split}'): "
                            f"{type(exc).__name__}: {exc}", field="dataset",
                            fix="Check the id, `subset` (config name) and `split`; or download the "
                                "data into the workspace and give the file path.") from exc

    def _hub_rows(self) -> Iterator[Row]:
        ds = self._hub_dataset()
        for i, row in enumerate(ds, start=1):
            yield i, dict(row)

    def _hub_count(self) -> int | None:
        try:
            info = self._hub_dataset().info
            return int(info.splits[self.split].num_examples)
        except Exception:  # noqa: BLE001 - size is optional
            return None


def _kind(path: Path) -> str:
    ext = path.suffix.lower()
    if ext in JSONL_EXT:
        return "jsonl"
    if ext in CSV_EXT:
        return "csv"
    if ext in PARQUET_EXT:
        return "parquet"
    return "json"  # .json or anything else: sniffed




def open_source(dataset: str, *, split: str = "train", subset: str | None = None,
                field_name: str = "dataset") -> Source:
    """Resolve `dataset` to a local file/directory in the workspace, or a hub id."""
    if dataset is None or not str(dataset).strip():
        raise UserError("is empty.", field=field_name,
                        fix="Give a JSONL/JSON/CSV/Parquet path inside the workspace, or a hub id.")
    dataset = str(dataset).strip()
    ws = get_workspace()
    path = ws.resolve(dataset, field=field_name)  # refuses paths outside the workspace
    if path.exists():
        if path.is_dir():
            files = _split_files(path, split, field_name)
            kinds = {_kind(f) for f in files}
            kind = kinds.pop() if len(kinds) == 1 else "mixed"
            unit = "line" if len(files) == 1 and kind != "parquet" else "row"
            return Source(dataset, kind, unit, files, split, subset)
        ext = path.suffix.lower()
        if ext in COMPRESSED_EXT:
            raise UserError(f"'{dataset}' is compressed ({ext}).", field=field_name,
                            fix="Decompress it first (e.g. `gunzip file.jsonl.gz`); JSONL, JSON, CSV "
                                "and Parquet are read.")
        return Source(dataset, _kind(path), "row" if _kind(path) == "parquet" else "line", [path],
                      split, subset)
    looks_like_file = Path(dataset).suffix.lower() in DATA_EXT | COMPRESSED_EXT
    if not looks_like_file and not os.path.isabs(dataset) and HUB_ID.match(dataset) \
            and not dataset.startswith("."):
        why = "offline mode: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set" if hub_offline() \
            else hub_unreachable()
        if why:
            raise UserError(f"'{dataset}' is not a file in the workspace, and the hub is unreachable "
                            f"({why}).", field=field_name,
                            fix="Check the path (relative to the workspace root); for a hub dataset, "
                                "download it where there is network access and put it in the "
                                "workspace as JSONL/Parquet, then pass its path.")
        return Source(dataset, "hub", "row", [], split, subset)
    raise UserError(f"'{dataset}' does not exist (looked at {path}).", field=field_name,
                    fix="Check the path; relative paths are taken from the workspace root.")


def _split_files(d: Path, split: str, field_name: str) -> list[Path]:
    """Data files of `split` in a directory: `<split>.<ext>`, `<split>-*.<ext>`, `data/<split>*`."""
    cands = [p for p in sorted(d.rglob("*")) if p.suffix.lower() in DATA_EXT and not p.is_dir()
             and not any(part.startswith(".") for part in p.relative_to(d).parts)]
    pat = re.compile(rf"(^|[-_.]){re.escape(split)}([-_.0-9]|$)")
    picked = [p for p in cands if pat.search(p.stem)]
    if not picked and len(cands) == 1 and split == "train":
        picked = cands
    if not picked:
        names = ", ".join(p.relative_to(d).as_posix() for p in cands[:10]) or "no data files"
        raise UserError(f"directory '{d.name}' has no data file for split '{split}' (found: {names}).",
                        field=field_name,
                        fix="Name the file directly, or pass the split its files are named after "
                            "(e.g. split='test' for test.jsonl).")
    ws = get_workspace()
    for p in picked:  # a link inside the folder must not lead out of the workspace
        ws.resolve(ws.contain(p, field=field_name, given=ws.rel(p) if p.is_relative_to(ws.root) else p),
                   field=field_name, kind="file")
    return picked


# ---- per-file readers ----------------------------------------------------------------------

def _decode(raw: bytes, lineno: int, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if lineno == 1 and (raw.startswith(b"\xff\xfe") or raw.startswith(b"\xfe\xff")):
            raise UserError(f"{path.name} is UTF-16 encoded, not UTF-8.", field="line 1",
                            fix=f"Re-encode it: `iconv -f UTF-16 -t UTF-8 {path.name} > out`.") from None
        bad = raw[exc.start:exc.start + 1].hex()
        raise UserError(f"{path.name} is not valid UTF-8 (byte 0x{bad} at column {exc.start + 1}); "
                        "the file is probably Latin-1/cp1252 or binary.", field=f"line {lineno}",
                        fix=f"Re-encode the file to UTF-8, e.g. `iconv -f cp1252 -t UTF-8 {path.name} > "
                            "out.jsonl`, or fix that line.") from None


def _json_error(path: Path, lineno: int, exc: json.JSONDecodeError, text: str) -> UserError:
    snippet = text.strip()[:80]
    return UserError(f"malformed JSON in {path.name}: {exc.msg} (column {exc.colno}): {snippet!r}",
                     field=f"line {lineno}",
                     fix="Fix or delete that line: JSONL needs exactly one complete JSON object per line.")


def _file_rows(path: Path, kind: str) -> Iterator[Row]:
    if kind == "jsonl":
        yield from _jsonl_rows(path)
    elif kind == "csv":
        yield from _csv_rows(path)
    elif kind == "parquet":
        yield from _parquet_rows(path)
    else:
        yield from _json_rows(path)


def _jsonl_rows(path: Path, start_line: int = 1, fh=None) -> Iterator[Row]:
    own = fh is None
    fh = fh or open(path, "rb")
    loads = json.loads
    try:
        for lineno, raw in enumerate(fh, start=start_line):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[3:]
            if not raw.strip():
                continue
            text = _decode(raw, lineno, path)
            try:
                row = loads(text)
            except json.JSONDecodeError as exc:
                raise _json_error(path, lineno, exc, text) from None
            if not isinstance(row, dict):
                raise UserError(f"{path.name}: expected a JSON object, got {type(row).__name__}.",
                                field=f"line {lineno}",
                                fix="Each line must be one object, e.g. {\"messages\": [...]}.")
            yield lineno, row
    finally:
        if own:
            fh.close()


def _json_rows(path: Path) -> Iterator[Row]:
    """A .json file: JSON Lines (what `Dataset.to_json` writes), an array, or an object."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
        stripped = head.lstrip(BOM).lstrip()
        if stripped[:1] == b"{":
            fh.seek(0)
            first = fh.readline()
            if first.startswith(BOM):
                first = first[3:]
            try:
                obj = json.loads(_decode(first, 1, path))
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):  # a complete object on line 1: JSON Lines
                yield 1, obj
                yield from _jsonl_rows(path, start_line=2, fh=fh)
                return
    raw = path.read_bytes()
    if raw.startswith(BOM):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        line_end = raw.find(b"\n", exc.start)
        _decode(raw[line_start:line_end if line_end >= 0 else len(raw)], lineno, path)
        raise  # pragma: no cover - _decode raised
    pos = _skip_ws(text, 0)
    if pos >= len(text):
        return
    dec = json.JSONDecoder()
    if text[pos] == "[":
        yield from _array_items(text, pos, path, dec)
        return
    try:
        obj, end = dec.raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        raise _json_error(path, exc.lineno, exc, text.splitlines()[exc.lineno - 1]
                          if text.splitlines() else "") from None
    if _skip_ws(text, end) < len(text):
        ln = text.count("\n", 0, _skip_ws(text, end)) + 1
        raise UserError(f"{path.name}: extra data after the JSON value.", field=f"line {ln}",
                        fix="A .json file must hold one array or object (or use one object per line).")
    if isinstance(obj, dict):
        lists = {k: v for k, v in obj.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        if len(lists) == 1:  # {"data": [...]} and friends
            for i, row in enumerate(next(iter(lists.values())), start=1):
                yield i, row if isinstance(row, dict) else {"value": row}
            return
        yield 1, obj
        return
    raise UserError(f"{path.name}: top-level JSON is a {type(obj).__name__}.", field="line 1",
                    fix="Use an array of objects, or JSON Lines (one object per line).")


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _array_items(text: str, pos: int, path: Path, dec: json.JSONDecoder) -> Iterator[Row]:
    """Items of a top-level array, each with the line it starts on."""
    pos += 1  # past "["
    line, counted = 1 + text.count("\n", 0, pos), pos
    pos = _skip_ws(text, pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise _json_error(path, exc.lineno, exc, text.splitlines()[exc.lineno - 1]) from None
        if not isinstance(obj, dict):
            raise UserError(f"{path.name}: array item is a {type(obj).__name__}, not an object.",
                            field=f"line {line}", fix="Every item must be a JSON object.")
        yield line, obj
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        ln = text.count("\n", 0, pos) + 1
        raise UserError(f"malformed JSON in {path.name}: expected ',' or ']' between array items.",
                        field=f"line {ln}", fix="Fix the JSON array at that line.")


def _csv_rows(path: Path) -> Iterator[Row]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    state = {"line": 0}

    def lines():
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if lineno == 1 and raw.startswith(BOM):
                    raw = raw[3:]
                state["line"] = lineno
                yield _decode(raw, lineno, path)

    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(lines(), delimiter=delim)
    header = None
    start = 1
    for rec in reader:
        if header is None:
            header = [h.strip() for h in rec]
            start = state["line"] + 1
            continue
        if not rec or all(not c.strip() for c in rec):
            start = state["line"] + 1
            continue
        if len(rec) != len(header):
            raise UserError(f"{path.name}: {len(rec)} fields, the header has {len(header)}.",
                            field=f"line {start}",
                            fix="Quote fields that contain the delimiter or newlines, or fix that row.")
        yield start, dict(zip(header, rec))
        start = state["line"] + 1


def _parquet_rows(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover
        raise UserError("reading Parquet needs pyarrow.", field="dataset",
                        fix="pip install pyarrow, or convert the file to JSONL.") from exc
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path.name} is not a readable Parquet file: {exc}", field="dataset",
                        fix="Check the file (was the download complete?).") from exc
    n = 0
    for batch in pf.iter_batches(batch_size=512):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def jsonable(value: Any) -> Any:
    """Make a value JSON-serialisable (numpy/arrow scalars from Parquet and the hub, bytes)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
