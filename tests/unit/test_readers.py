"""Which CSV files Spark may split at line breaks: those with no line break inside quotes."""

from __future__ import annotations

import gzip

import pytest

from querylog import readers
from querylog.readers import InputFile, spans_lines

CASES = [
    ("query,label\ncheap flights,travel\n", False),
    ('query,label\n"say ""hi""",music\n"a, b",books\r\nlast,music', False),
    ('query,label\n"multi\nline",books\n', True),
    ('query,label\nfirst,travel\n"carriage\rreturn",books\n', True),
    ('query,label\n"unclosed,books\nnext,music\n', True),  # unbalanced: read whole, as before
    ('query,label\n"""quoted"" start\nnext",books\n', True),
]


@pytest.mark.parametrize("chunk", [3, 1 << 23])  # the quote parity carries across chunks
@pytest.mark.parametrize(("text", "spans"), CASES)
def test_a_line_break_inside_quotes_is_found(tmp_path, monkeypatch, chunk, text, spans):
    monkeypatch.setattr(readers, "_SCAN_BYTES", chunk)
    path = tmp_path / "log.csv"
    path.write_bytes(text.encode())
    assert spans_lines(InputFile(path.as_uri(), "csv")) is spans
    assert spans_lines(InputFile(str(path), "csv")) is spans


def test_compressed_and_remote_files_are_read_whole(tmp_path):
    path = tmp_path / "log.csv.gz"
    path.write_bytes(gzip.compress(b"query,label\nplain,travel\n"))
    assert spans_lines(InputFile(str(path), "csv"))
    assert spans_lines(InputFile("hdfs://namenode/logs/log.csv", "csv"))
