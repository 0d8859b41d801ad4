"""Every CSV reader, fuzzed: a hostile or broken file gives a result or the reader's own error.

A CSV is user input like an upload: it may be binary, in another encoding, cut short, quoted
wrongly, or built to break the parser. Each reader documents one error class (a ``ValueError``
the CLI prints as one ``error:`` line); any other exception — ``UnicodeDecodeError``,
``csv.Error``, ``KeyError``, ``AttributeError``, an ``OSError`` from a key too long to be a
file name — is a bug, because it turns a typo into a traceback. The message must be one line
(cells are shown escaped), since the CLI promises one. The readers share one table, so a new
reader is fuzzed the moment it is listed.

Two strategies: arbitrary bytes (the parser's edges), and valid files put through a few
mutations — a cell replaced by junk, dropped or added, another header, line ending, quoting
or encoding, spliced bytes — so Hypothesis gets past the header into the rows and shrinks a
failure towards the valid file it came from.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

from lookalike.core.pairs import PairsError, read_pairs
from lookalike.evaluation.challenge import ChallengeFormatError, read_challenge
from lookalike.index.build import SourceError, discover_images
from lookalike.models.data import DataError, load_labelled_pairs, load_tll_pairs

IMAGES = ("a", "b", "c")
"""Real (tiny) JPEGs in ``left/``, ``right/`` and the CSV's folder, so valid rows exist."""
image = st.sampled_from(IMAGES)
pair = st.lists(image, min_size=2, max_size=2)


@dataclass(frozen=True)
class CsvReader:
    name: str
    read: Callable[[Path], object]
    error: type[ValueError]
    header: tuple[str, ...]
    row: st.SearchStrategy[list[str]]
    """Rows that are valid under ``header``."""
    other_headers: tuple[tuple[str, ...], ...] = ()
    """More headers the reader accepts (column order, extra columns)."""


READERS = [
    CsvReader("read_pairs", read_pairs, PairsError, ("left", "right"), pair,
              (("right", "left", "note"),)),
    CsvReader("read_challenge", read_challenge, ChallengeFormatError, ("left", "c0", "c1"),
              st.permutations(IMAGES), (("left", "c0"),)),
    CsvReader("discover_images", discover_images, SourceError, ("path", "key", "note"),
              st.lists(st.sampled_from(["left/a.jpg", "right/b.jpg", "c.jpg", "", "x"]),
                       min_size=3, max_size=3),
              (("path",), ("key", "path"))),
    CsvReader("load_tll_pairs", load_tll_pairs, DataError, ("left", "right"), pair),
    CsvReader("load_labelled_pairs", load_labelled_pairs, DataError, ("a", "b", "label"),
              st.tuples(st.sampled_from(["left/a.jpg", "right/b", "c"]),
                        st.sampled_from(["left/a", "right/c.jpg"]),
                        st.sampled_from(["1", "0"])).map(list)),
]
BY_NAME = pytest.mark.parametrize("reader", READERS, ids=[r.name for r in READERS])

WORDS = [
    "", " ", "a", "b", "c", "left/a.jpg", "right/b", "a.jpg", "left/", "../a", "/", ".",
    "0", "1", " 1 ", "2", "-1", "1.0", "1e3", "nan", "true", "left", "right", "path", "key",
    "label", "c0", "c1", "\x00", "é", "\ufeff", "\u2028", "\x1b[2J", "<script>", "a" * 300,
]
junk_cell = st.one_of(
    st.sampled_from(WORDS),
    st.text(max_size=10),
    st.text(alphabet=',"\r\n\x00 \t;\\', max_size=5),
    st.sampled_from([5_000, 140_000]).map(lambda n: "x" * n),  # past csv's field limit
)


@st.composite
def csv_files(draw: st.DrawFn, reader: CsvReader) -> bytes:
    """A valid file for ``reader`` with 0 to 4 mutations, rendered in a drawn dialect."""
    header = draw(st.sampled_from([reader.header, *reader.other_headers]))
    rows = [list(header), *draw(st.lists(reader.row, min_size=1, max_size=4))]
    if header != reader.header:  # rows follow the canonical header: re-order by name
        rows[1:] = [
            [dict(zip(reader.header, row, strict=False)).get(name, "n") for name in header]
            for row in rows[1:]
        ]
    for _ in range(draw(st.integers(0, 4))):
        row = rows[draw(st.integers(0, len(rows) - 1))]
        at = draw(st.integers(0, len(row)))
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "add" or not row:
            row.insert(at, draw(junk_cell))
        elif action == "replace":
            row[min(at, len(row) - 1)] = draw(junk_cell)
        else:
            del row[min(at, len(row) - 1)]
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    if draw(st.booleans()):
        buffer = io.StringIO()
        quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
        csv.writer(buffer, lineterminator=newline, quoting=quoting).writerows(rows)
        text = buffer.getvalue()
    else:  # joined by hand: stray quotes and separators stay unbalanced
        text = newline.join(",".join(row) for row in rows) + draw(st.sampled_from(["", newline]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    data = text.encode(encoding, errors="replace")
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    return data


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``left/``, ``right/`` and loose images; each example rewrites ``in.csv``."""
    root = tmp_path_factory.mktemp("csv-fuzz")
    for folder in (root, root / "left", root / "right"):
        folder.mkdir(exist_ok=True)
        for name in IMAGES:
            Image.new("RGB", (4, 4), (len(name), 90, 200)).save(folder / f"{name}.jpg")
    return root


def read(reader: CsvReader, workspace: Path, data: bytes) -> object:
    """Write ``data`` and read it (see :func:`outcome`)."""
    path = workspace / "in.csv"
    path.write_bytes(data)
    return outcome(reader, path)


def outcome(reader: CsvReader, path: Path) -> object:
    """A result, or the documented error with a one-line message; any other exception fails
    the test."""
    try:
        return reader.read(path)
    except reader.error as exc:
        message = str(exc)
        assert message.strip(), "an error must say what is wrong"
        assert "\n" not in message and "\r" not in message, f"not one line: {message!r}"
        return exc


@BY_NAME
def test_documented_errors_are_value_errors(reader: CsvReader) -> None:
    assert issubclass(reader.error, ValueError)


VALID = {
    "read_pairs": ("\ufeffleft,right\r\na,b\r\nb,c\r\n", 2),
    "read_challenge": ('left,c0,c1\n"a",b,c\n\n', 1),
    "discover_images": ("path,key,note\nleft/a.jpg,one,x\nright/b.jpg,,y\n", 2),
    "load_tll_pairs": ("left,right,note\na,b,\n", 1),
    "load_labelled_pairs": ("a,b,label\nleft/a.jpg,right/b,1\nleft/b,right/c.jpg, 0\n", 2),
}


@BY_NAME
def test_a_valid_file_is_read(reader: CsvReader, workspace: Path) -> None:
    """The fuzz below can fail: each reader does accept a good file."""
    text, count = VALID[reader.name]
    result = read(reader, workspace, text.encode())
    assert not isinstance(result, Exception), result
    assert len(getattr(result, "pairs", result)) == count


@BY_NAME
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=600))
def test_random_bytes(reader: CsvReader, workspace: Path, data: bytes) -> None:
    event(type(read(reader, workspace, data)).__name__)


@BY_NAME
@settings(max_examples=200, deadline=None)
@given(draw=st.data())
def test_mutated_valid_files(reader: CsvReader, workspace: Path, draw: st.DataObject) -> None:
    event(type(read(reader, workspace, draw.draw(csv_files(reader)))).__name__)


EDGE_CASES = {
    "empty": b"",
    "bom only": codecs.BOM_UTF8,
    "newlines only": b"\r\n\r\n\n",
    "invalid utf-8": b"left,right\n\xff\xfe\xfa,b\n",
    "utf-16": "left,right\na,b\n".encode("utf-16"),
    "nul bytes": b"left,right\na\x00,b\x00\n",
    "open quote": b'left,right\n"a,b\n',
    "quote in field": b'left,right\na"b,c\n',
    "huge field": b"left,right,path,a,b,label\n" + b"x" * 200_000 + b",b\n",
    "newline in header": b'"left\nright",x\n',
    "one column": b"left\na\n",
    "missing cell": b"left,right,c0,path,a,b,label\na\n",
    "extra cells": b"left,right,c0,path,a,b,label\na,b,c,d,e,f,g,h,i\n",
    "duplicated header": b"left,left,right,path,path,a,a,b,label,label\n1,2,3,4,5,6,7,8,9,1\n",
    "long key": b"left,right,c0,path,key,a,b,label\n" + (b"k" * 300 + b",") * 7 + b"1\n",
    "nul key": b"left,right,c0,path,a,b,label\na\x00,a\x00,a\x00,a\x00,a\x00,a\x00,1\n",
    "numeric junk": b"a,b,label\nleft/a.jpg,right/b.jpg,1e3\nleft/a.jpg,right/b.jpg,-0\n",
}


@BY_NAME
@pytest.mark.parametrize("data", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_edge_cases(reader: CsvReader, workspace: Path, data: bytes) -> None:
    read(reader, workspace, data)


@BY_NAME
def test_a_folder_or_a_missing_file(reader: CsvReader, workspace: Path) -> None:
    """A folder where a CSV belongs was an ``IsADirectoryError`` traceback in two readers
    (``discover_images`` reads a folder as a source of images: a result is right there)."""
    assert isinstance(outcome(reader, workspace / "missing.csv"), reader.error)
    outcome(reader, workspace / "left")
