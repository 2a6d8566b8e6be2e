"""Safe image decoding: size limits are checked from the header before any pixel is decoded."""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ditepose.service.core.errors import ServiceError

FORMATS = ("JPEG", "PNG", "WEBP")


class DecodeSlots:
    """At most ``limit`` images decoded at once (``Settings.max_concurrent_decodes``; None: one per core).

    Why: decoding is CPU work, so more decodes than cores at once are no faster, and each one holds
    the decoder's working copies (PIL's image, the EXIF-rotated and RGB copies, the array: a 12 MP
    photo is ~36 MB per copy). Without a cap, a burst of large uploads decoded in as many threads
    as the executor has (cores + 4) held all their copies at once. Waiting callers hold only
    their encoded bytes. A thread primitive: decoding runs in worker threads, and a slot is held
    only while pixels are being made (never across an await), so waiting cannot deadlock."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit or os.cpu_count() or 1
        self._slots = threading.BoundedSemaphore(self.limit)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        with self._slots:
            yield


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode JPEG/PNG/WebP bytes to an RGB uint8 array [H, W, 3], EXIF orientation applied.

    Raises :class:`ServiceError` with ``too_large`` (bytes or pixels over the limit; the pixel
    count comes from the header, so decompression bombs are refused unread), ``not_an_image``
    or ``undecodable``.
    """
    if not data:
        raise ServiceError("not_an_image", "the image is empty")
    if len(data) > max_bytes:
        raise ServiceError("too_large", f"the image has {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ServiceError("too_large", f"the image has too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ServiceError("not_an_image", "the upload is not a JPEG, PNG or WebP image") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ServiceError("undecodable", f"cannot read the image header: {exc}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise ServiceError("undecodable", f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ServiceError(
            "too_large", f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            upright = ImageOps.exif_transpose(image) or image
            rgb = upright.convert("RGB")
    except Image.DecompressionBombError as exc:  # pragma: no cover - caught by the header check
        raise ServiceError("too_large", str(exc)) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ServiceError("undecodable", f"cannot decode the image: {exc}") from exc
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def encode_png(image_rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_rgb).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()
