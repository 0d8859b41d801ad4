"""Safe decoding: every format on the allow-list decodes; everything else fails clearly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lookalike.models.preprocess import (
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    Preprocessor,
    UnsupportedImageError,
    decode_image,
)


@pytest.fixture(scope="module")
def photo(demo_dir: Path) -> Image.Image:
    return Image.open(demo_dir / "left" / "abh.jpg").convert("RGB")


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_allowed_formats_decode_to_rgb(photo: Image.Image, fmt: str) -> None:
    image = decode_image(encode(photo, fmt))
    assert image.mode == "RGB" and image.size == photo.size


def test_exif_orientation_is_applied(photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    image = decode_image(encode(photo, "JPEG", exif=exif.tobytes()))
    assert image.size == (photo.height, photo.width)


def test_empty_bytes() -> None:
    with pytest.raises(EmptyImageError, match="empty"):
        decode_image(b"")


def test_text_is_not_an_image() -> None:
    with pytest.raises(UnsupportedImageError, match="supported format"):
        decode_image(b"name,score\nalice,3\n")


def test_formats_off_the_allow_list_are_refused(photo: Image.Image) -> None:
    with pytest.raises(UnsupportedImageError):
        decode_image(encode(photo, "TIFF"))


def test_truncated_jpeg(demo_dir: Path) -> None:
    data = (demo_dir / "left" / "abh.jpg").read_bytes()
    with pytest.raises(CorruptImageError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = encode(Image.new("1", (12_000, 12_000)), "PNG")  # ~20 kB on disk, 144 Mpx
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLargeError, match="144,000,000 pixels"):
        decode_image(bomb)


def test_pixel_limit_is_configurable(photo: Image.Image) -> None:
    with pytest.raises(ImageTooLargeError):
        decode_image(encode(photo, "PNG"), max_pixels=1000)


def test_large_jpeg_decodes_in_draft_mode(photo: Image.Image) -> None:
    big = encode(photo.resize((2000, 2450)), "JPEG")
    assert max(decode_image(big, draft_size=224).size) < 2000


def test_preprocessor_output(photo: Image.Image) -> None:
    prep = Preprocessor(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    array = prep(photo)
    assert array.shape == (3, 224, 224) and array.dtype == np.float32
    assert -1.0 - 1e-3 <= array.min() and array.max() <= 1.0 + 1e-3
    assert prep.batch([photo, photo]).shape == (2, 3, 224, 224)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    try:
        decode_image(data)
    except ImageDecodeError:
        pass


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=0, max_value=4000), flip=st.integers(0, 255))
def test_damaged_pngs_fail_cleanly(photo: Image.Image, cut: int, flip: int) -> None:
    data = bytearray(encode(photo.resize((40, 40)), "PNG"))
    position = cut % len(data)
    data[position] ^= flip
    try:
        decode_image(bytes(data))
    except ImageDecodeError:
        pass
