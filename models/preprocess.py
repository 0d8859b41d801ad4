"""Safe image decoding and the model's input transform.

This is the only module that opens image bytes. Decoding untrusted uploads is where an
image service gets hurt, so every step is checked in order, cheapest first:

1. the bytes are not empty;
2. the header names a format on the allow-list (JPEG, PNG, WebP, BMP, GIF) — Pillow reads
   only the header at ``Image.open``;
3. the header's pixel count is under the limit, *before* any pixel is decoded (a 50 kB PNG can
   expand to gigabytes: a decompression bomb). Pillow's own bomb check only warns below
   twice its limit; here the limit raises;
4. the decoding work is bounded before it starts: a progressive JPEG may hold at most
   ``MAX_JPEG_SCANS`` scans (libjpeg walks every block of the image once per scan, so a 1 MB
   file repeating a tiny scan thousands of times costs a minute of CPU); JPEGs larger than
   needed decode at a reduced scale (``draft``), which is both faster and smaller in memory;
5. full decode; truncated data raises instead of returning a half-grey image, including a PNG
   whose compressed data ends cleanly before its last row (Pillow fills those rows with
   zeros without a word, so the rows are counted here) and a JPEG cut short and closed with
   an end marker (libjpeg fills the missing blocks and only warns, and Pillow drops the
   warning, so JPEGs are also run through libjpeg-turbo's strict mode via ``simplejpeg``, at
   1/8 scale: the entropy-coded data is read whole, the pixels are not built);
6. EXIF orientation is applied (unreadable EXIF is ignored: broken metadata must not make
   good pixels unusable) and the image converted to RGB (first frame of a GIF);
7. only pixels leave: the file's metadata (comments, text chunks, EXIF, ICC) is dropped, since
   Pillow would otherwise copy e.g. a ``<script>`` comment into every JPEG re-encoded from it
   (a thumbnail served back to browsers).

The format comes from the magic bytes alone, never from a file name or content type; bytes
after the image's end (an appended ZIP or HTML: a polyglot) are ignored, so such a file
decodes to exactly the pixels of the clean image.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from ..core.errors import (
    BadRequestError,
    InvalidInputError,
    TooLargeError,
    UnsupportedMediaError,
)

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "EmptyImageError",
    "UnsupportedImageError",
    "ImageTooLargeError",
    "CorruptImageError",
    "MAX_JPEG_SCANS",
    "count_jpeg_scans",
    "decode_image",
    "declared_work",
    "Preprocessor",
    "make_thumbnail",
]

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF"})
DEFAULT_MAX_PIXELS = 40_000_000
"""About 40 megapixels: any real photo, never a bomb (decoded RGB is ~120 MB at the limit)."""
MAX_JPEG_SCANS = 64
"""Scans per JPEG. Encoders write 1 (baseline) or about 10 (progressive; mozjpeg's optimised
scripts up to about 20)."""


class ImageDecodeError(InvalidInputError):
    """The bytes are not an image lookalike will decode. ``str(error)`` is safe to show users."""


class EmptyImageError(BadRequestError, ImageDecodeError):
    """An upload of 0 bytes."""


class UnsupportedImageError(UnsupportedMediaError, ImageDecodeError):
    """Not one of the allowed formats (judged by the magic bytes)."""


class ImageTooLargeError(TooLargeError, ImageDecodeError):
    """Over the pixel limit, judged from the header before decoding."""


class CorruptImageError(ImageDecodeError):
    """A header or pixel data that cannot be decoded whole."""


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode untrusted bytes to an RGB image, or raise an :class:`ImageDecodeError`.

    ``draft_size`` lets JPEGs decode at the smallest power-of-two scale that keeps both sides
    at least that large (the model resizes to its input size anyway).
    """
    image = _open_header(data)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"image header gives an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"
        )
    if image.format == "JPEG":
        scans = count_jpeg_scans(data)
        if scans > MAX_JPEG_SCANS:
            raise CorruptImageError(
                f"JPEG with {scans:,} scans; the limit is {MAX_JPEG_SCANS} (a progressive "
                "JPEG from a camera or an encoder has about 10)"
            )
        _check_jpeg_data(data)
        if draft_size:
            image.draft("RGB", (draft_size, draft_size))
    if image.format == "PNG":
        _check_png_rows(data, image)
    try:
        image.load()
        image = _upright(image).convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image is too large to decode: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImageError(f"the image data is truncated or corrupt: {exc}") from exc
    image.info = {}
    return image


def _open_header(data: bytes) -> Image.Image:
    """Read only the header (format from the magic bytes, size); no pixel is decoded."""
    if not data:
        raise EmptyImageError("the upload is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; decode_image raises instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image is too large to decode: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise UnsupportedImageError(
            f"not an image in a supported format ({', '.join(sorted(ALLOWED_FORMATS))})"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(f"cannot read the image header: {exc}") from exc


TYPICAL_JPEG_SCANS = 10
"""Scans of an ordinary progressive JPEG: the decoding work of a JPEG scales with its scans
beyond this."""


def declared_work(data: bytes) -> int:
    """The decoding work an image's header promises, in pixel passes: width x height, times
    ``scans / TYPICAL_JPEG_SCANS`` for a progressive JPEG with more scans than usual (libjpeg
    walks every block once per scan). Nothing is decoded; 0 when the header cannot be read.
    Scans are counted only in progressive JPEGs (a baseline JPEG has one per colour at most):
    the walk costs about half a millisecond for a photo, ten times the header read."""
    try:
        image = _open_header(data)
    except ImageDecodeError:
        return 0
    width, height = image.size
    pixels = max(width, 0) * max(height, 0)
    if image.format == "JPEG" and image.info.get("progressive"):
        return pixels * max(TYPICAL_JPEG_SCANS, count_jpeg_scans(data)) // TYPICAL_JPEG_SCANS
    return pixels


_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")
"""A marker inside entropy-coded data: 0xFF (fill bytes allowed) not followed by a stuffed
zero or a restart marker."""
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: no length field


def count_jpeg_scans(data: bytes) -> int:
    """The number of scans (SOS segments) before the JPEG's end, walking the segments by their
    lengths, so bytes inside a segment (an EXIF thumbnail is a JPEG too) are not counted."""
    scans, position = 0, 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return scans  # not a marker: let the decoder say what is wrong
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xD9:  # EOI
            return scans
        if marker in _STANDALONE:
            position += 2
            continue
        (length,) = struct.unpack_from(">H", data, position + 2)
        position += 2 + length
        if marker == 0xDA:  # SOS: its entropy-coded data runs up to the next marker
            scans += 1
            found = _JPEG_MARKER.search(data, position)
            if found is None:
                return scans
            position = found.start(1) - 1
    return scans


def _check_jpeg_data(data: bytes) -> None:
    """Raise if libjpeg-turbo reports the JPEG's entropy-coded data as short or corrupt.

    libjpeg treats "premature end of data segment" as a warning and fills the rest of the
    image with grey; ``simplejpeg`` in strict mode turns such warnings into errors. Decoding
    at 1/8 scale still reads every scan but builds only a small image (~0.2-0.5 ms for a TLL
    photo). JPEGs that libjpeg-turbo's fast path cannot convert to RGB (CMYK, YCCK) are left
    to Pillow's decoder.
    """
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
    except ValueError:
        return  # a header simplejpeg cannot read: Pillow's decode reports what is wrong
    target = {"Gray": "GRAY", "YCbCr": "RGB", "RGB": "RGB", "CMYK": "CMYK"}.get(colorspace)
    if target is None:
        return
    try:
        simplejpeg.decode_jpeg(data, colorspace=target, min_factor=8, strict=True)
    except ValueError as exc:
        raise CorruptImageError(f"the image data is truncated or corrupt: {exc}") from exc


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))  # (x0, y0, dx, dy) of the seven interlace passes


def _check_png_rows(data: bytes, image: Image.Image) -> None:
    """Raise if the PNG's compressed data holds fewer bytes than its header's rows need."""
    width, height = image.size
    depth, colour, interlace = data[24], data[25], data[28]
    bits = depth * _PNG_CHANNELS.get(colour, 4)

    def row_bytes(columns: int) -> int:
        return 1 + (columns * bits + 7) // 8  # a filter byte, then the packed samples

    if interlace:
        passes = [((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy)
                  for x0, y0, dx, dy in _ADAM7]
        expected = sum(rows * row_bytes(cols) for cols, rows in passes if cols and rows)
    else:
        expected = height * row_bytes(width)
    inflate, found, position = zlib.decompressobj(), 0, 8
    while position + 8 <= len(data) and found < expected:
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IDAT":
            chunk = data[position + 8 : position + 8 + length]
            while chunk and found < expected:
                try:
                    found += len(inflate.decompress(chunk, 1 << 20))
                except zlib.error:
                    return  # corrupt, not short: Pillow's decoder reports it
                chunk = inflate.unconsumed_tail
        elif kind == b"IEND":
            break
        position += 12 + length
    if found < expected:
        raise CorruptImageError(
            f"the PNG's pixel data ends early: {found:,} of {expected:,} bytes "
            f"({found * height // expected} of {height} rows)"
        )


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned by its EXIF orientation; as stored when the EXIF cannot be parsed."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error):  # "not a TIFF file"
        return image


def make_thumbnail(image: Image.Image, size: int = 192, quality: int = 82) -> bytes:
    """A small JPEG of ``image`` (longer side ``size``) to show in result lists."""
    thumb = image.copy()
    thumb.thumbnail((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class Preprocessor:
    """Resize the shorter side to ``size``, centre-crop a square, scale and normalise.

    Output is float32 ``(3, size, size)``, the layout every engine takes.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_pixels: int = DEFAULT_MAX_PIXELS

    def decode(self, data: bytes) -> Image.Image:
        return decode_image(data, max_pixels=self.max_pixels, draft_size=self.size)

    def __call__(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """``image`` -> float32 ``(3, size, size)``, written into ``out`` when given (a row of
        a batch array, so that a batch is never copied again by stacking)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        scale = self.size / min(width, height)
        new_w, new_h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        # Resize and crop in one call: Pillow resamples only the kept box.
        box = (left / scale, top / scale, (left + self.size) / scale, (top + self.size) / scale)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if out is None:
            out = np.empty((3, self.size, self.size), np.float32)
        # Per contiguous band, (x / 255 - mean) / std as one multiply-add: about 4x faster
        # than normalising the interleaved HWC array and transposing it.
        for channel, band in enumerate(image.split()):
            scale_c = np.float32(1.0 / (255.0 * self.std[channel]))
            np.multiply(np.asarray(band), scale_c, out=out[channel], casting="unsafe")
            out[channel] += np.float32(-self.mean[channel] / self.std[channel])
        return out

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Stack images into a ``(B, 3, size, size)`` float32 array."""
        batch = np.empty((len(images), 3, self.size, self.size), np.float32)
        for row, image in zip(batch, images, strict=True):
            self(image, out=row)
        return batch
