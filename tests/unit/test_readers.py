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
    ('query,label\n12" pizza,"a\nb"\n', True),  # a stray quote would hide the line break
    ('query,label\nlast,"unclosed', True),  # unbalanced at the end
    ("query,label\nfirst,travel\n   \nnext,books\n", True),  # a line of spaces only
    ("query,label\nfirst,travel\n\t", True),
    ('\ufeffquery,label\r\n"a",b\r\n\r\n', False),  # a BOM, CRLF, an empty line
]


@pytest.mark.parametrize("chunk", [3, 1 << 23])  # the quote parity carries across chunks
@pytest.mark.parametrize(("text", "spans"), CASES)
def test_a_line_break_inside_quotes_is_found(tmp_path, monkeypatch, chunk, text, spans):
    monkeypatch.setattr(readers, "_SCAN_BYTES", chunk)
    path = tmp_path / "log.csv"
    path.write_bytes(text.encode())
    assert spans_lines(InputFile(path.as_uri(), "csv")) is spans
    assert spans_lines(InputFile(str(path), "csv")) is spans


def test_a_tab_separated_file_opens_quotes_after_tabs(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_bytes(b'query\tlabel\n"a\tb"\t"books"\n')
    assert not spans_lines(InputFile(str(path), "csv"))
    path.write_bytes(b'query,label\n"a,b","books"\n')  # commas: a quote not after a tab
    assert spans_lines(InputFile(str(path), "csv"))


def test_compressed_and_remote_files_are_read_whole(tmp_path):
    path = tmp_path / "log.csv.gz"
    path.write_bytes(gzip.compress(b"query,label\nplain,travel\n"))
    assert spans_lines(InputFile(str(path), "csv"))
    assert spans_lines(InputFile("hdfs://namenode/logs/log.csv", "csv"))
