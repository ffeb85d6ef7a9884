"""Reading raw logs in CSV, JSONL and Parquet into one frame (docs/architecture.md, "Data
contract").

Files are listed through Hadoop's FileSystem (local paths, HDFS, S3 alike), skipping hidden
``_``/``.`` paths (markers, the generator's ``_truth/``). Each file's schema is checked on its
own, so a file without a ``query`` column stops the stage naming that file; files that agree
on a schema are read together. Malformed lines are kept in ``_corrupt_record`` for quarantine,
and every row carries the file it came from in ``source_file``.

A file that goes away between the listing and the reading (rotated, moved, deleted by another
process) stops the stage with one line naming it: at planning time in :func:`read_raw`, while
Spark reads in :func:`held_inputs`. Nothing is skipped silently, so no row is lost unseen.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from urllib.parse import unquote, urlparse

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.errors import ConfigError, DataError, ZipflineError

log = logging.getLogger("zipfline")

CANONICAL = ("query", "label", "ts", "weight")
CORRUPT = "_corrupt_record"
SOURCE = "source_file"
_EXTENSIONS = {
    ".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
}  # fmt: skip
_COMPRESSED = (".gz", ".bz2", ".deflate", ".snappy", ".zst", ".lz4")


@dataclass(frozen=True)
class InputFile:
    uri: str
    fmt: str

    @property
    def local_path(self) -> Path | None:
        parsed = urlparse(self.uri)
        return Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else None


def format_of(name: str) -> str | None:
    """The format a file name implies, looking through a compression suffix."""
    lower = name.lower()
    for suffix in _COMPRESSED:
        if lower.endswith(suffix) and not lower.endswith(".parquet" + suffix):
            lower = lower[: -len(suffix)]
            break
    for ext, fmt in _EXTENSIONS.items():
        if lower.endswith(ext):
            return fmt
    return None


def list_input_files(spark: SparkSession, path: str, fmt: str, key: str) -> list[InputFile]:
    """Data files under ``path`` (a file or a folder, recursive), with their formats."""
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    fs = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    if not fs.exists(hpath):
        raise ConfigError(f"{key} = {path}: no such file or folder")
    statuses = []
    if fs.getFileStatus(hpath).isFile():
        statuses.append(fs.getFileStatus(hpath))
    else:
        it = fs.listFiles(hpath, True)
        while it.hasNext():
            statuses.append(it.next())
    root = hpath.toUri().getPath().rstrip("/")
    files: list[InputFile] = []
    skipped: list[str] = []
    for status in statuses:
        uri = status.getPath().toString()
        rel = status.getPath().toUri().getPath()[len(root) :].lstrip("/")
        if any(part.startswith(("_", ".")) for part in rel.split("/") if part):
            continue
        file_fmt = fmt if fmt != "auto" else format_of(status.getPath().getName())
        if file_fmt is None:
            skipped.append(uri)
        elif status.getLen() > 0:
            files.append(InputFile(uri, file_fmt))
    if skipped:
        log.warning(
            "%s: skipped %d file(s) of unknown format, e.g. %s (set %s_format)",
            key,
            len(skipped),
            skipped[0],
            key.rsplit("_", 1)[0],
        )
    return sorted(files, key=lambda f: f.uri)


def _canonical(name: str) -> str:
    clean = name.strip().lstrip("\ufeff").strip()
    return clean.lower() if clean.lower() in CANONICAL else clean


def _csv_header(spark: SparkSession, f: InputFile) -> list[str]:
    local = f.local_path
    if local is None:
        return spark.read.option("header", True).csv(f.uri).columns
    opener = gzip.open if local.name.lower().endswith(".gz") else open
    with opener(local, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
        return next(csv.reader(text, delimiter=_separator(local.name)), [])


def _parquet_schema(spark: SparkSession, f: InputFile) -> tuple[tuple[str, str], ...]:
    local = f.local_path
    if local is None:
        return tuple(
            (fl.name, fl.dataType.simpleString()) for fl in spark.read.parquet(f.uri).schema
        )
    # start-up speed: pyarrow only for local Parquet schemas
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(local)
    except Exception as exc:  # pyarrow raises several types for a broken footer
        raise DataError(f"{f.uri}: not a readable Parquet file ({exc})") from exc
    return tuple((fl.name, str(fl.type)) for fl in schema)


def _check_columns(f: InputFile, columns: list[str]) -> list[str]:
    names = [_canonical(c) for c in columns]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{f.uri}: duplicate column(s) {', '.join(dupes)}")
    if "query" not in names:
        found = ", ".join(columns) if columns else "no header"
        raise DataError(f"{f.uri}: missing the required column 'query' (found: {found})")
    return names


def _normalized(df: DataFrame) -> DataFrame:
    """Canonical column names, the canonical columns as strings, ``source_file`` attached."""
    df = df.withColumn(SOURCE, F.col("_metadata.file_path"))
    for name in df.columns:
        canon = _canonical(name)
        if canon != name:
            df = df.withColumnRenamed(name, canon)
    for name in CANONICAL:
        if name in df.columns:
            df = df.withColumn(name, F.col(name).cast("string"))
    return df


_SCAN_BYTES = 1 << 23  # 8 MiB at a time
_BLANK_LINE = re.compile(rb"[\r\n][ \t]+[\r\n]")  # a line of spaces and tabs only
_LINE_STARTS_BLANK = (b"\n ", b"\n\t", b"\r ", b"\r\t")  # found by memchr before the regex


def _separator(name: str) -> str:
    return "\t" if name.lower().removesuffix(".gz").endswith(".tsv") else ","


def spans_lines(f: InputFile) -> bool:
    """Whether a CSV file must be read whole (``multiLine``, one task per file) rather than
    split across tasks at line breaks: whether a record may span lines, or a line parse could
    cut the file otherwise than a whole-file parse.

    A local uncompressed file is scanned once, vectorized (about 12 s per GB on one core). A line
    break is inside a quoted field when an odd number of quote characters precede it (an escaped
    quote, ``""``, counts twice). The scan also answers "whole" where the two parses could differ
    on a malformed file: a quote that opens a field anywhere but at its start (a stray quote makes
    the parity lie), unbalanced quotes at the end, and a line of only spaces or tabs (a line parse
    drops it, a whole-file parse reads it as a row). Remote and compressed files, which cannot be
    split anyway or scanned cheaply, are read whole.
    """
    local = f.local_path
    if local is None or local.name.lower().endswith(_COMPRESSED):
        return True
    # start-up speed: numpy only when a CSV file is read
    import numpy as np

    starts = np.frombuffer(b'\n\r"' + _separator(local.name).encode(), dtype=np.uint8)
    inside = np.uint8(0)  # the parity of the quotes before this chunk
    before = b"\n"  # the byte before this chunk (a file starts as after a line break)
    partial = b""  # the unfinished last line of the chunk before, for the blank-line check
    with open(local, "rb") as fh:
        while chunk := fh.read(_SCAN_BYTES):
            cut = max(chunk.rfind(b"\n"), chunk.rfind(b"\r")) + 1
            lines = b"\n" + partial + chunk[:cut]
            if any(s in lines for s in _LINE_STARTS_BLANK) and _BLANK_LINE.search(lines):
                return True
            partial = (partial + chunk) if cut == 0 else chunk[cut:]
            if partial.strip(b" \t"):
                partial = b"x"  # not blank: all the check needs to keep of it
            if b'"' not in chunk:
                if inside and (b"\n" in chunk or b"\r" in chunk):
                    return True
                before = chunk[-1:]
                continue
            data = np.frombuffer(chunk, dtype=np.uint8)
            quote = data == ord('"')
            parity = np.bitwise_xor.accumulate(quote.view(np.uint8)) ^ inside
            if (parity.view(bool) & ((data == ord("\n")) | (data == ord("\r")))).any():
                return True
            opening = np.flatnonzero(quote & (parity == 1))
            previous = data[opening - 1]  # at 0: data[-1], replaced by the chunk before's
            if len(opening) and opening[0] == 0:
                previous[0] = before[0]
            if not np.isin(previous, starts).all():
                return True
            inside, before = parity[-1], chunk[-1:]
    return bool(inside) or partial.strip(b" \t") == b"" != partial


def _read_csv(spark: SparkSession, files: list[InputFile]) -> list[DataFrame]:
    groups: dict[tuple[tuple[str, ...], str, bool], list[str]] = defaultdict(list)
    for f in files:
        names = tuple(_check_columns(f, _csv_header(spark, f)))
        groups[names, _separator(f.uri), spans_lines(f)].append(f.uri)
    frames = []
    for (names, sep, multiline), uris in groups.items():
        schema = T.StructType(
            [T.StructField(n, T.StringType()) for n in names]
            + [T.StructField(CORRUPT, T.StringType())]
        )
        reader = (
            spark.read.schema(schema)
            .option("header", True)
            .option("multiLine", multiline)  # else Spark splits large files across tasks
            .option("escape", '"')
            .option("sep", sep)
            .option("mode", "PERMISSIVE")
            .option("columnNameOfCorruptRecord", CORRUPT)
            .option("encoding", "UTF-8")
        )
        frames.append(_normalized(reader.csv(uris)))
    return frames


def _read_jsonl(spark: SparkSession, files: list[InputFile]) -> list[DataFrame]:
    uris = [f.uri for f in files]
    df = (
        spark.read.option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", CORRUPT)
        .option("primitivesAsString", True)
        .json(uris)
    )
    names = [_canonical(c) for c in df.columns]
    if "query" not in names:
        shown = ", ".join(uris[:3]) + (" …" if len(uris) > 3 else "")
        raise DataError(
            f"{shown}: missing the required field 'query' (found: {', '.join(df.columns)})"
        )
    if CORRUPT not in df.columns:
        df = df.withColumn(CORRUPT, F.lit(None).cast("string"))
    return [_normalized(df)]


def _read_parquet(spark: SparkSession, files: list[InputFile]) -> list[DataFrame]:
    groups: dict[tuple[tuple[str, str], ...], list[str]] = defaultdict(list)
    for f in files:
        schema = _parquet_schema(spark, f)
        _check_columns(f, [name for name, _ in schema])
        groups[schema].append(f.uri)
    frames = []
    for uris in groups.values():
        df = _normalized(spark.read.parquet(*uris))
        frames.append(df.withColumn(CORRUPT, F.lit(None).cast("string")))
    return frames


_READERS = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}


def read_raw(spark: SparkSession, path: str, fmt: str, key: str) -> DataFrame:
    """All rows under ``path`` as one frame: canonical columns as strings, extras as they are,
    ``_corrupt_record`` for malformed lines and ``source_file``.

    A missing path is a :class:`ConfigError` (exit 2); no data files, or a file without a
    ``query`` column, a :class:`DataError` (exit 1) naming the path or file.
    """
    files = list_input_files(spark, path, fmt, key)
    if not files:
        raise DataError(f"no rows: {key} = {path} holds no non-empty CSV, JSONL or Parquet files")
    by_fmt: dict[str, list[InputFile]] = defaultdict(list)
    for f in files:
        by_fmt[f.fmt].append(f)
    with _vanished_means_error(spark, [f.uri for f in files], key):
        frames = [f for fmt_, group in by_fmt.items() for f in _READERS[fmt_](spark, group)]
    try:
        return reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), frames)
    except Exception as exc:  # AnalysisException on conflicting extra-column types
        raise DataError(f"{key} = {path}: files disagree on column types ({exc})") from exc


def _missing(spark: SparkSession, uris: list[str]) -> list[str]:
    """Those of ``uris`` that are no longer there, asked of Hadoop's FileSystem (any scheme)."""
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    gone = []
    for uri in uris:
        hpath = jvm.org.apache.hadoop.fs.Path(uri)
        if not hpath.getFileSystem(conf).exists(hpath):
            gone.append(uri)
    return gone


@contextlib.contextmanager
def _vanished_means_error(spark: SparkSession, uris: list[str], key: str) -> Iterator[None]:
    try:
        yield
    except ZipflineError:
        raise
    except Exception as exc:  # Spark's FileNotFoundException, PATH_NOT_FOUND; Python's OSError
        gone = _missing(spark, uris)
        if not gone:
            raise
        more = f" and {len(gone) - 1} more" if len(gone) > 1 else ""
        raise DataError(
            f"{key}: {gone[0]}{more} went away between listing and reading (moved or deleted "
            "while this run read it); nothing was written: put it back, or leave it out on "
            "purpose, and run again"
        ) from exc


@contextlib.contextmanager
def held_inputs(spark: SparkSession, df: DataFrame, key: str) -> Iterator[None]:
    """Around the actions on a frame of :func:`read_raw`: a failure while one of its files has
    gone away becomes one :class:`DataError` naming it; any other failure passes through."""
    with _vanished_means_error(spark, list(df.inputFiles()), key):
        yield
