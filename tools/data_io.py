"""Reading dataset rows one at a time, with their line numbers, from local files or the hub.

Local: JSONL (streamed line by line; a JSON array under a .jsonl name is read as an array, as
`datasets` does), JSON (an array, an object holding one, or JSON Lines under a .json name),
CSV/TSV (streamed; the delimiter is sniffed, so Excel's ';' CSV reads), Parquet (streamed by
record batch), a `datasets.save_to_disk` directory (read with `datasets.load_from_disk`), or a
directory holding such files for a split (`train.jsonl`, `data/train-*.parquet`, ...). Hub: a
dataset id, read with `datasets.load_dataset(..., streaming=True)` when the hub is reachable.

Text is UTF-8 (with or without BOM) or UTF-16 (with a BOM, or without one: told apart by where
its NUL bytes fall). NaN/Infinity (which pandas writes into JSON, and Parquet floats can hold)
are read as null and counted. Rows come out JSON-ready (numpy/arrow scalars converted).

Every row comes with its location: the 1-based line where it starts (JSONL, JSON, CSV) or its
1-based row number (Parquet, hub, several files). Undecodable bytes and malformed JSON raise
UserError naming the line.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

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

SNIFF_BYTES = 1 << 16   # head of a file read to tell its encoding, JSON shape and CSV delimiter
CSV_DELIMITERS = ",;\t|"

Row = tuple[int, dict]  # (location, row)


@dataclass
class _ReadState:
    """What the readers tell the Source about the row they just yielded, and about the files."""
    non_finite: int = 0                                   # NaN/Infinity read as null in that row
    notes: dict[str, None] = field(default_factory=dict)  # how the input was read (ordered set)

    def constant(self, name: str) -> None:
        """json parse_constant hook: NaN, Infinity, -Infinity become null (None), counted."""
        self.non_finite += 1


@dataclass
class Source:
    """An opened dataset: what it is, and how to iterate it."""
    name: str                      # as the caller gave it
    kind: str                      # jsonl | json | csv | parquet | hub | disk | mixed
    unit: str                      # "line" or "row": what locations count
    files: list[Path] = field(default_factory=list)
    split: str = "train"
    subset: str | None = None
    root: Path | None = None       # the save_to_disk directory (kind "disk")
    _st: _ReadState = field(default_factory=_ReadState, repr=False)

    @property
    def path(self) -> Path | None:
        return self.files[0] if len(self.files) == 1 else None

    @property
    def notes(self) -> list[str]:
        """How the input was read, when that is not plain UTF-8 JSONL (encoding, delimiter...)."""
        return list(self._st.notes)

    def rows(self, limit: int | None = None, on_change: Callable[[str, int, str], None] | None = None
             ) -> Iterator[Row]:
        """Yield (location, row dict) in file order; at most `limit` rows. on_change(kind, loc,
        detail) hears of values the reader changed (NaN read as null) in the rows it yields."""
        it = {"hub": self._hub_rows, "disk": self._disk_rows}.get(self.kind, self._local_rows)()
        n = 0
        self._st.non_finite = 0
        for loc, row in it:
            changed, self._st.non_finite = self._st.non_finite, 0
            if limit is not None and n >= limit:
                return
            n += 1
            if changed and on_change is not None:
                on_change("nan_as_null", loc, f"{changed} NaN/Infinity value(s) read as null")
            yield loc, row

    def count_rows(self) -> int | None:
        """Total rows, counted cheaply where possible (None when unknown: hub streaming)."""
        if self.kind == "hub":
            return self._hub_count()
        if self.kind == "disk":
            return len(self._disk_dataset())
        total = 0
        for f in self.files:
            kind = _kind(f)
            if kind == "jsonl" and not _holds_array(f, self._st):
                total += sum(1 for line in _byte_lines(f, self._st) if line.strip())
            elif kind == "parquet":
                import pyarrow.parquet as pq
                total += pq.ParquetFile(f).metadata.num_rows
            else:
                total += sum(1 for _ in _file_rows(f, kind, self._st))
        return total

    # -- local -----------------------------------------------------------------------------
    def _local_rows(self) -> Iterator[Row]:
        if len(self.files) == 1:
            yield from _file_rows(self.files[0], _kind(self.files[0]), self._st)
            return
        n = 0  # several files: number rows across them
        for f in self.files:
            for _, row in _file_rows(f, _kind(f), self._st):
                n += 1
                yield n, row

    # -- datasets.save_to_disk ---------------------------------------------------------------
    def _disk_dataset(self):
        """The split of a save_to_disk directory, opened (memory-mapped) with load_from_disk."""
        from .heavy import warm
        warm("datasets")
        import datasets
        try:
            ds = datasets.load_from_disk(str(self.root))
        except Exception as exc:  # noqa: BLE001 - a damaged folder is the caller's to fix
            raise UserError(f"'{self.name}' looks like a datasets.save_to_disk folder but "
                            f"load_from_disk failed: {type(exc).__name__}: {exc}", field="dataset",
                            fix="Check the folder is complete (state.json, dataset_info.json, "
                                "*.arrow), or export it with Dataset.to_json(...).") from None
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise UserError(f"the saved DatasetDict '{self.name}' has no split '{self.split}' "
                                f"(splits: {', '.join(ds)}).", field="split",
                                fix=f"Pass split= one of {', '.join(ds)}.")
            ds = ds[self.split]
        return ds

    def _disk_rows(self) -> Iterator[Row]:
        self._st.notes.setdefault(f"read with datasets.load_from_disk (a save_to_disk folder, split "
                                  f"'{self.split}' where it holds several)", None)
        for i, row in enumerate(self._disk_dataset(), start=1):
            yield i, jsonable(row, self._st)

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
            yield i, jsonable(dict(row), self._st)

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


def _is_disk_dataset(d: Path) -> bool:
    """A folder datasets' save_to_disk wrote: dataset_dict.json (a DatasetDict), or state.json
    next to its .arrow shards (a Dataset)."""
    return (d / "dataset_dict.json").is_file() or \
        ((d / "state.json").is_file() and any(d.glob("*.arrow")))


def _disk_source(dataset: str, path: Path, split: str, subset: str | None, field_name: str) -> Source:
    """A save_to_disk folder: every file in it must stay in the workspace (load_from_disk opens
    them itself); its .arrow files are listed so an output_dir inside it is refused."""
    ws = get_workspace()
    ws.contain_tree(path, field=field_name)
    arrows = sorted(p for p in path.rglob("*.arrow") if p.is_file())
    return Source(dataset, "disk", "row", arrows, split, subset, root=path)


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
        if path.is_dir() and _is_disk_dataset(path):
            return _disk_source(dataset, path, split, subset, field_name)
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

def _encoding(head: bytes) -> str:
    """utf-8, utf-8-sig, utf-16 (a BOM says the order), or utf-16-le/-be without a BOM: text
    that is mostly ASCII has a NUL in every other byte there (odd bytes for LE, even for BE)."""
    if head.startswith(BOM):
        return "utf-8-sig"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    even, odd = head[0::2], head[1::2]
    if len(head) >= 4 and b"\x00" in head:
        if odd.count(0) > len(odd) / 3 and even.count(0) < len(even) / 20:
            return "utf-16-le"
        if even.count(0) > len(even) / 3 and odd.count(0) < len(odd) / 20:
            return "utf-16-be"
    return "utf-8"


def _file_encoding(path: Path, st: _ReadState) -> str:
    with open(path, "rb") as fh:
        enc = _encoding(fh.read(SNIFF_BYTES))
    if enc.startswith("utf-16"):
        st.notes.setdefault(f"{path.name}: decoded as {enc.upper()}"
                            + ("" if enc == "utf-16" else " (no byte-order mark)"), None)
    return enc


def _byte_lines(path: Path, st: _ReadState) -> Iterator[bytes]:
    """The file's lines as UTF-8 bytes, without a BOM: UTF-16 files are decoded on the fly."""
    enc = _file_encoding(path, st)
    if not enc.startswith("utf-16"):
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                yield raw[3:] if lineno == 1 and raw.startswith(BOM) else raw
        return
    with open(path, encoding=enc, newline="\n") as fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, start=1):
                yield line.encode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise UserError(f"{path.name} looks like {enc.upper()} but does not decode as it (after "
                            f"line {lineno}).", field=f"line {lineno + 1}",
                            fix=f"Re-encode the file to UTF-8 (e.g. `iconv -f {enc.upper()} -t UTF-8 "
                                f"{path.name} > out`), or fix that line.") from None


def _read_text(path: Path, st: _ReadState) -> str:
    """The whole file as text (UTF-8 or UTF-16), undecodable bytes named by their line."""
    raw = b"".join(_byte_lines(path, st))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        line_end = raw.find(b"\n", exc.start)
        _decode(raw[line_start:line_end if line_end >= 0 else len(raw)], lineno, path)
        raise  # pragma: no cover - _decode raised


def _holds_array(path: Path, st: _ReadState) -> bool:
    """Whether the file's first non-blank character is '[' (a JSON array)."""
    for line in _byte_lines(path, st):
        if line.strip():
            return line.lstrip()[:1] == b"["
    return False


def _decode(raw: bytes, lineno: int, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
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


def _file_rows(path: Path, kind: str, st: _ReadState) -> Iterator[Row]:
    if kind == "jsonl" and _holds_array(path, st):  # datasets reads such a file as JSON too
        st.notes.setdefault(f"{path.name} holds a JSON array, not JSON Lines: read as an array", None)
        kind = "json"
    if kind == "jsonl":
        yield from _jsonl_rows(path, st, _byte_lines(path, st))
    elif kind == "csv":
        yield from _csv_rows(path, st)
    elif kind == "parquet":
        yield from _parquet_rows(path, st)
    else:
        yield from _json_rows(path, st)


def _decoder(st: _ReadState) -> json.JSONDecoder:
    """json's decoder, with NaN/Infinity (invalid JSON that pandas writes) read as null and
    counted: float('nan') would otherwise become the text "nan" in a prompt."""
    return json.JSONDecoder(parse_constant=st.constant)


def _jsonl_rows(path: Path, st: _ReadState, lines: Iterator[bytes], start_line: int = 1) -> Iterator[Row]:
    loads = _decoder(st).decode
    for lineno, raw in enumerate(lines, start=start_line):
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


def _json_rows(path: Path, st: _ReadState) -> Iterator[Row]:
    """A .json file: JSON Lines (what `Dataset.to_json` writes), an array, or an object."""
    lines = _byte_lines(path, st)
    first = next(lines, b"")
    if first.lstrip()[:1] == b"{":
        try:
            obj = _decoder(st).decode(_decode(first, 1, path))
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):  # a complete object on line 1: JSON Lines
            yield 1, obj
            yield from _jsonl_rows(path, st, lines, start_line=2)
            return
    lines.close()
    text = _read_text(path, st)
    pos = _skip_ws(text, 0)
    if pos >= len(text):
        return
    dec = _decoder(st)
    if text[pos] == "[":
        yield from _array_items(text, pos, path, dec)
        return
    yield from _object_rows(text, pos, path, dec)


def _object_rows(text: str, pos: int, path: Path, dec: json.JSONDecoder) -> Iterator[Row]:
    """A .json file holding one object: its one list of objects ({"data": [...]}), or itself."""
    try:
        obj, end = dec.raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        raise _json_error(path, exc.lineno, exc, text.splitlines()[exc.lineno - 1]
                          if text.splitlines() else "") from None
    _no_extra_data(text, end, path)
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


def _no_extra_data(text: str, end: int, path: Path) -> None:
    if _skip_ws(text, end) < len(text):
        ln = text.count("\n", 0, _skip_ws(text, end)) + 1
        raise UserError(f"{path.name}: extra data after the JSON value.", field=f"line {ln}",
                        fix="A JSON file must hold one array or object; JSON Lines hold one object "
                            "per line (not one array per line).")


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
        _no_extra_data(text, pos + 1, path)
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
            _no_extra_data(text, pos + 1, path)
            return
        ln = text.count("\n", 0, pos) + 1
        raise UserError(f"malformed JSON in {path.name}: expected ',' or ']' between array items.",
                        field=f"line {ln}", fix="Fix the JSON array at that line.")


def _csv_delimiter(path: Path, st: _ReadState) -> str:
    """',' unless the file says otherwise: csv.Sniffer on the first lines, checked against the
    header (Excel writes ';' where ',' is the decimal mark); .tsv is tab-separated."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    sample: list[str] = []
    size = 0
    for raw in _byte_lines(path, st):
        sample.append(raw.decode("utf-8", "replace"))
        size += len(raw)
        if size >= SNIFF_BYTES or len(sample) >= 50:
            break
    header = sample[0] if sample else ""
    try:
        delim = csv.Sniffer().sniff("".join(sample), delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        delim = ","
    if delim not in header:  # the sniffer guessed from the body: trust the header's count
        delim = max(CSV_DELIMITERS, key=header.count) if any(c in header for c in CSV_DELIMITERS) else ","
    if delim != ",":
        st.notes.setdefault(f"{path.name}: CSV delimiter {delim!r} detected", None)
    return delim


def _csv_rows(path: Path, st: _ReadState) -> Iterator[Row]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    state = {"line": 0}

    def lines():
        for lineno, raw in enumerate(_byte_lines(path, st), start=1):
            state["line"] = lineno
            yield _decode(raw, lineno, path)

    reader = csv.reader(lines(), delimiter=_csv_delimiter(path, st))
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


def _parquet_rows(path: Path, st: _ReadState) -> Iterator[Row]:
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
            yield n, jsonable(row, st)


def jsonable(value: Any, st: _ReadState | None = None) -> Any:
    """Make a value JSON-serialisable (numpy/arrow scalars from Parquet and the hub, bytes);
    NaN/Infinity become None (counted in `st`): JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        if st is not None:
            st.non_finite += 1
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v, st) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, st) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist(), st)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
