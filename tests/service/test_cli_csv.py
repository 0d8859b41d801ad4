"""Every command that reads a CSV turns a broken one into one ``error:`` line and exit code 2.

The readers themselves are fuzzed in tests/evaluation/test_csv_fuzz.py; this checks the last
step, that the command line reports their errors instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HEADER = b"left,right,c0,c1,path,a,b,label\n"
BROKEN = {  # content (None: a folder) -> what the error line says besides the path
    "invalid utf-8": (HEADER + b"\xff\xfe\x00\x89PNG,\xc3\x28\n", "UTF-8"),
    "field past the csv limit": (HEADER + b"x" * 140_000 + b"\n", "field limit"),
    "a folder": (None, ""),
}

COMMANDS = {
    "make-candidates (pairs)": ("make-candidates", "{csv}", "--out", "{tmp}/c.csv"),
    "rank --candidates": (
        "rank", "-c", "{csv}", "--query-dir", "{tmp}", "--candidate-dir", "{tmp}",
        "--out", "{tmp}/s.csv",
    ),
    "index build (csv source)": ("index", "build", "{csv}", "--out", "{tmp}/store"),
    "train --pairs": (
        "train", "--pairs", "{csv}", "--left-dir", "{tmp}", "--right-dir", "{tmp}",
        "--out", "{tmp}/model", "--no-progress",
    ),
    "train --labelled": ("train", "--labelled", "{csv}", "--out", "{tmp}/model", "--no-progress"),
}


@pytest.mark.parametrize(("content", "says"), BROKEN.values(), ids=BROKEN.keys())
@pytest.mark.parametrize("args", COMMANDS.values(), ids=COMMANDS.keys())
def test_a_broken_csv_is_one_error_line(
    run, tmp_path: Path, args: tuple[str, ...], content: bytes | None, says: str
) -> None:
    broken = tmp_path / "broken.csv"
    if content is None:
        broken.mkdir()
    else:
        broken.write_bytes(content)
    result = run(*(arg.format(csv=broken, tmp=tmp_path) for arg in args))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert str(broken) in lines[0] and says in lines[0]
    assert not (tmp_path / "store").exists() and not (tmp_path / "model").exists()
