import hashlib
import os
import shutil

import pytest

from lookalike.core.files import atomic_write, bytes_sha256, file_sha256, images_identity


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


def test_images_identity_follows_content_not_timestamps(tmp_path):
    """A cache keyed on it survives a data set copied again (new mtimes, same bytes) and
    notices an image edited in place with its size and mtime kept."""
    image = tmp_path / "a.jpg"
    image.write_bytes(b"\xff\xd8one")
    before = images_identity([image])
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**12))
    assert images_identity([image]) == before
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(image, copy / "a.jpg")
    assert images_identity([copy / "a.jpg"])[0][1] == before[0][1]
    stat = image.stat()
    image.write_bytes(b"\xff\xd8two")
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size
    assert images_identity([image]) != before
