import hashlib

import pytest

from lookalike.core.files import atomic_write, bytes_sha256, file_sha256


def test_atomic_write_bytes_text_and_callable(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write(target, b"one")
    assert target.read_bytes() == b"one"
    atomic_write(target, "two")
    assert target.read_text() == "two"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"three"))
    assert target.read_bytes() == b"three"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write(target, b"old")

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_hashes_agree_with_hashlib(tmp_path):
    data = bytes(range(256)) * 5000
    path = tmp_path / "f"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_sha256(path, chunk_size=4096) == expected == bytes_sha256(data)
