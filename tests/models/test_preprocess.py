"""Safe decoding: every format on the allow-list decodes; everything else fails clearly."""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from lookalike.models.preprocess import (
    MAX_JPEG_SCANS,
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    Preprocessor,
    UnsupportedImageError,
    count_jpeg_scans,
    declared_work,
    decode_image,
    make_thumbnail,
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


# Polyglots: files that are two things at once. The policy, in this order:
# - the format comes from the magic bytes at offset 0, never from a name or content type, so a
#   file that starts as anything else (PDF, HTML, SVG, ZIP) is refused even if an image follows;
# - bytes after the image's end, or in chunks and segments the decoder skips, are ignored: the
#   file decodes to exactly the pixels of the clean image (hence the same embedding);
# - only pixels leave the decoder, so nothing a client hid in the file (a comment, a text
#   chunk, an ICC or EXIF segment) reaches a re-encoded thumbnail that browsers are served.

PAYLOAD = b"<html><script>alert('polyglot')</script></html>"


def zip_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("index.html", PAYLOAD)
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
@pytest.mark.parametrize("tail", ["zip", "html"])
def test_bytes_after_the_image_are_ignored(photo: Image.Image, fmt: str, tail: str) -> None:
    clean = encode(photo.resize((64, 80)), fmt)
    polyglot = clean + (zip_archive() if tail == "zip" else PAYLOAD)
    assert zipfile.is_zipfile(io.BytesIO(polyglot)) == (tail == "zip")  # a real archive too
    assert np.array_equal(pixels(polyglot), pixels(clean))


def test_a_gif_whose_header_is_javascript_decodes_as_the_gif() -> None:
    """GIFAR-style: width 0x2a2f makes the header ``GIF8?a/*``, a JavaScript comment that the
    appended ``*/=...`` closes, so the file runs as a script and still shows as an image."""
    clean = encode(Image.new("RGB", (0x2A2F, 2), (200, 30, 30)), "GIF")
    polyglot = clean + b"*/=1;alert('polyglot');"
    assert polyglot[6:8] == b"/*" and polyglot.find(b"*/") == len(clean)
    assert np.array_equal(pixels(polyglot), pixels(clean))


def test_png_chunks_carrying_html_are_ignored(photo: Image.Image) -> None:
    clean = encode(photo.resize((64, 80)), "PNG")
    ihdr_end = 8 + 25  # signature, then IHDR (4 length + 4 type + 13 data + 4 CRC)
    iend = clean.rindex(b"IEND") - 4
    polyglot = (
        clean[:ihdr_end]
        + png_chunk(b"htMl", PAYLOAD)  # private ancillary chunk: decoders must skip it
        + png_chunk(b"tEXt", b"comment\x00" + PAYLOAD)
        + clean[ihdr_end:iend]
        + png_chunk(b"zTXt", b"html\x00\x00" + zlib.compress(PAYLOAD))
        + clean[iend:]
    )
    assert np.array_equal(pixels(polyglot), pixels(clean))


@pytest.mark.parametrize(
    "wrapper",
    [
        lambda jpeg: b"%PDF-1.7\n1 0 obj\n<< /Length 9 >>\nstream\n" + jpeg,
        lambda jpeg: PAYLOAD + jpeg,
        lambda jpeg: b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>' + jpeg,
        lambda jpeg: zip_archive() + jpeg,
        lambda jpeg: b"\x00" + jpeg,
    ],
    ids=["pdf", "html", "svg", "zip", "one-byte-shift"],
)
def test_an_image_inside_another_format_is_refused(
    photo: Image.Image, wrapper: Callable[[bytes], bytes]
) -> None:
    with pytest.raises(UnsupportedImageError, match="supported format"):
        decode_image(wrapper(encode(photo, "JPEG")))


def test_huge_icc_and_exif_segments_decode_to_the_same_pixels(photo: Image.Image) -> None:
    small = photo.resize((64, 80))
    clean = encode(small, "JPEG", quality=90)
    icc = random.Random(0).randbytes(1_000_000)  # split over 16 APP2 segments
    exif = b"Exif\x00\x00" + PAYLOAD * 1300  # ~63 kB, near the 64 kB APP1 limit; not TIFF
    bloated = encode(small, "JPEG", quality=90, icc_profile=icc, exif=exif)
    assert len(bloated) > len(clean) + 1_000_000
    assert np.array_equal(pixels(bloated), pixels(clean))


def png_text(key: str, value: bytes) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(key, value.decode())
    return info


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("JPEG", {"comment": PAYLOAD, "icc_profile": PAYLOAD}),
        ("GIF", {"comment": PAYLOAD}),
        ("PNG", {"pnginfo": png_text("comment", PAYLOAD)}),
        ("WEBP", {"exif": b"Exif\x00\x00" + PAYLOAD, "icc_profile": PAYLOAD}),
    ],
    ids=["jpeg", "gif", "png", "webp"],
)
def test_metadata_never_leaves_the_decoder(photo: Image.Image, fmt: str, options: dict) -> None:
    """Pillow copies a decoded image's ``comment`` into every JPEG saved from it: without the
    decoder dropping metadata, the thumbnail served for an upload carried its ``<script>``."""
    data = encode(photo.resize((64, 80)), fmt, **options)
    assert PAYLOAD in data
    image = decode_image(data)
    assert image.info == {}
    thumbnail = make_thumbnail(image)
    assert b"script" not in thumbnail and thumbnail.startswith(b"\xff\xd8")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@settings(max_examples=90, deadline=None)
@given(
    fmt=st.sampled_from(["JPEG", "PNG", "WEBP"]),
    exif=st.tuples(
        st.sampled_from([b"", b"Exif\x00\x00", b"MM\x00*\x00\x00\x00\x08", b"II*\x00"]),
        st.binary(max_size=300),
    ).map(b"".join),
)
def test_junk_exif_does_not_cost_the_pixels(fmt: str, exif: bytes) -> None:
    """EXIF only turns the image; when it cannot be parsed the image decodes as stored (a
    solid colour: every orientation gives the same pixels)."""
    square = Image.new("RGB", (8, 8), (10, 200, 30))
    assert np.array_equal(pixels(encode(square, fmt, exif=exif)), pixels(encode(square, fmt)))


def short_png(width: int = 200, height: int = 245, rows: int = 122) -> bytes:
    """A PNG whose header says ``width x height`` but whose (complete, valid) compressed data
    holds only ``rows`` rows."""
    rng = np.random.default_rng(0)
    raw = b"".join(b"\0" + rng.integers(0, 255, width * 3, np.uint8).tobytes()
                   for _ in range(rows))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def test_a_png_whose_rows_end_early_is_refused() -> None:
    with pytest.raises(CorruptImageError, match="122 of 245 rows"):
        decode_image(short_png())
    assert decode_image(short_png(rows=245)).size == (200, 245)  # the complete one decodes


@pytest.mark.parametrize(
    ("mode", "options"),
    [("RGB", {}), ("RGBA", {}), ("L", {}), ("LA", {}), ("P", {}), ("1", {}), ("I;16", {}),
     ("RGB", {"compress_level": 0})],
)
def test_complete_pngs_of_every_kind_pass_the_row_count(
    photo: Image.Image, mode: str, options: dict
) -> None:
    image = photo.resize((37, 29)).convert(mode)  # odd sizes: partial bytes per row
    assert decode_image(encode(image, "PNG", **options)).size == (37, 29)


def test_an_interlaced_png_passes_the_row_count() -> None:
    """Adam7 by hand (Pillow does not write interlaced PNGs): 7 passes of 8-bit grey."""
    width, height = 13, 11
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
              (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b""
    for x0, y0, dx, dy in passes:
        cols, rows = len(range(x0, width, dx)), len(range(y0, height, dy))
        if cols and rows:
            raw += (b"\0" + b"\x80" * cols) * rows
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 1)
    png = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
           + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))
    assert decode_image(png).size == (width, height)
    with pytest.raises(CorruptImageError, match="ends early"):
        short = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
                 + png_chunk(b"IDAT", zlib.compress(raw[:-20])) + png_chunk(b"IEND", b""))
        decode_image(short)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_cut_images_are_refused_in_every_format(photo: Image.Image, fmt: str) -> None:
    data = encode(photo.resize((200, 245)), fmt)
    for fraction in (0.5, 0.9, 0.99):
        with pytest.raises(CorruptImageError):
            decode_image(data[: int(len(data) * fraction)])


def many_scan_jpeg(photo: Image.Image, repeats: int) -> bytes:
    """A progressive JPEG whose last scan header repeats ``repeats`` times with one byte of
    data each: about 16 bytes a scan, and each scan makes libjpeg walk every block."""
    data = encode(photo.resize((2000, 2000)), "JPEG", progressive=True, quality=50)
    last = data.rindex(b"\xff\xda")
    (length,) = struct.unpack_from(">H", data, last + 2)
    return data[:-2] + (data[last : last + 2 + length] + b"\0") * repeats + b"\xff\xd9"


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding(photo: Image.Image) -> None:
    hostile = many_scan_jpeg(photo, 20_000)  # about 0.3 MB; 10 s or more to decode
    assert count_jpeg_scans(hostile) == 20_010
    with pytest.raises(CorruptImageError, match="20,010 scans"):
        decode_image(hostile, draft_size=260)
    progressive = encode(photo, "JPEG", progressive=True)
    assert count_jpeg_scans(progressive) <= 12 < MAX_JPEG_SCANS
    assert decode_image(progressive).size == photo.size
    # Scan markers inside a segment (an EXIF thumbnail is a JPEG) are not counted.
    thumbnail = encode(photo.resize((64, 64)), "JPEG", progressive=True)
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumbnail) * 8 + 2) + thumbnail * 8
    baseline = encode(photo, "JPEG")
    assert count_jpeg_scans(baseline[:2] + app1 + baseline[2:]) == 1


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_a_jpeg_cut_short_and_closed_with_an_end_marker_is_refused(
    photo: Image.Image, mode: str, progressive: bool
) -> None:
    clean = encode(photo.resize((200, 245)).convert(mode), "JPEG", progressive=progressive)
    assert decode_image(clean).size == (200, 245)
    for fraction in (0.3, 0.6, 0.9):
        closed = clean[: int(len(clean) * fraction)] + b"\xff\xd9"
        with pytest.raises(CorruptImageError, match="truncated or corrupt"):
            decode_image(closed)


def test_declared_work_weighs_the_scans_of_progressive_jpegs(photo: Image.Image) -> None:
    """The lane choice's cost estimate: pixels, times scans / 10 for a progressive JPEG with
    more than 10 scans; read from the header and the segments, nothing decoded."""
    assert declared_work(encode(photo.resize((1000, 800)), "JPEG")) == 800_000
    assert declared_work(encode(photo.resize((1000, 800)), "JPEG", progressive=True)) == 800_000
    assert declared_work(encode(photo.resize((300, 200)), "PNG")) == 60_000
    hostile = many_scan_jpeg(photo, 50)  # 2000 x 2000, about 60 scans: under the scan limit
    scans = count_jpeg_scans(hostile)
    assert 50 < scans <= MAX_JPEG_SCANS
    assert declared_work(hostile) == 4_000_000 * scans // 10
    assert declared_work(b"not an image") == 0
