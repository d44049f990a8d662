"""Decode and validate request images into uint8 RGB arrays, with clear errors.

Every format is normalised here so a plugin sees one thing: a (H, W, 3) uint8 array.
16-bit images are scaled to 8 bits, grey is replicated to RGB, and alpha is composited on
black (the background of segmented-cell images).
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import heap
from .errors import ServingError, bad_image
from .v1 import diagnostics_pb2 as pb

FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
#: Images over this many pixels are decoded and processed one at a time (`memory_slot`): each
#: costs a few hundred MB while it is worked on, so several at once would multiply that.
LARGE_PIXELS = 4_000_000
_LARGE_IMAGE = threading.Lock()


def header_pixels(image: pb.Image) -> int:
    """Width x height as the request states it (raw) or its file's header says (encoded), read
    without decoding a pixel; 0 when unreadable (decoding then gives the precise error)."""
    kind = image.WhichOneof("data")
    if kind == "raw":
        return image.raw.width * image.raw.height
    if kind == "encoded":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(image.encoded)) as opened:
                    return opened.size[0] * opened.size[1]
        except Exception:
            return 0
    return 0


@contextlib.contextmanager
def memory_slot(image: pb.Image):
    """Held while one request's image is decoded and processed (in a worker thread): for an
    image over LARGE_PIXELS, the one slot for large images, so that the memory decoding takes
    is bounded by one large image at a time whatever arrives; for others, nothing."""
    if header_pixels(image) > LARGE_PIXELS:
        with _LARGE_IMAGE:
            try:
                yield
            finally:
                heap.return_freed_memory()  # each decode thread's malloc arena would keep its high-water mark
    else:
        yield


def limit_pixels(max_pixels: int) -> None:
    """Set Pillow's decompression-bomb limit to the server's pixel limit: Pillow then warns
    (an error inside `decode`) on any larger image, whichever code path opens it."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode(image: pb.Image, max_pixels: int, min_side: int = 1, whose: str = "max_image_pixels") -> np.ndarray:
    """The request's image as uint8 RGB, or ServingError(INVALID_ARGUMENT); `whose` names the
    pixel limit in its message (the server's setting, or a plugin's own)."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        rgb = _decode_encoded(image.encoded, max_pixels, whose)
        field = "image.encoded"
    elif kind == "raw":
        rgb = _decode_raw(image.raw, max_pixels, whose)
        field = "image.raw"
    else:
        raise bad_image("IMAGE_MISSING", "the request carries no image (set image.encoded or image.raw)")
    height, width = rgb.shape[:2]
    if min(height, width) < min_side:
        raise bad_image("IMAGE_TOO_SMALL", f"{width}x{height} px is below the plugin's minimum side of {min_side} px", field)
    return rgb


def _decode_encoded(data: bytes, max_pixels: int, whose: str = "max_image_pixels") -> np.ndarray:
    if not data:
        raise bad_image("IMAGE_EMPTY", "image.encoded is empty", "image.encoded")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in FORMATS:
                    raise bad_image("IMAGE_FORMAT", f"format {image.format} is not accepted (accepted: {', '.join(FORMATS)})", "image.encoded")
                width, height = image.size
                # Checked from the header, before any pixel is decoded: a small file can hold a huge image.
                _check_size(width, height, max_pixels, "image.encoded", whose)
                image.load()
                return to_rgb(image)
    except ServingError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow refuses it as it opens the header (its limit is the server's: limit_pixels); say
        # so in the server's words, not Pillow's "decompression bomb DOS attack" (issue 31).
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        found = f"{int(pixels.group(1))} px" if pixels else "the image"
        raise bad_image("IMAGE_TOO_LARGE", f"{found} exceeds the limit of {Image.MAX_IMAGE_PIXELS} pixels (max_image_pixels)",
                        "image.encoded") from None
    except UnidentifiedImageError:
        raise bad_image("IMAGE_UNREADABLE", f"not a readable image ({', '.join(FORMATS)} expected)", "image.encoded") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        # Pillow's words for a truncated or corrupt file.
        raise bad_image("IMAGE_CORRUPT", f"the image file is damaged: {error}", "image.encoded") from None


def _decode_raw(raw: pb.RawImage, max_pixels: int, whose: str = "max_image_pixels") -> np.ndarray:
    if raw.width == 0 or raw.height == 0:
        raise bad_image("IMAGE_EMPTY", f"raw image of {raw.width}x{raw.height} px has no pixels", "image.raw")
    if raw.channels not in (1, 3, 4):
        raise bad_image("IMAGE_CHANNELS", f"raw images have 1, 3 or 4 channels, not {raw.channels}", "image.raw.channels")
    _check_size(raw.width, raw.height, max_pixels, "image.raw", whose)
    expected = raw.width * raw.height * raw.channels
    if len(raw.pixels) != expected:
        raise bad_image(
            "IMAGE_SIZE_MISMATCH",
            f"{raw.width}x{raw.height}x{raw.channels} needs {expected} bytes, got {len(raw.pixels)}",
            "image.raw.pixels",
        )
    pixels = np.frombuffer(raw.pixels, np.uint8).reshape(raw.height, raw.width, raw.channels)
    return to_rgb(Image.fromarray(pixels[..., 0] if raw.channels == 1 else pixels))


def _check_size(width: int, height: int, max_pixels: int, field: str, whose: str = "max_image_pixels") -> None:
    if width <= 0 or height <= 0:
        raise bad_image("IMAGE_EMPTY", f"image of {width}x{height} px has no pixels", field)
    if width * height > max_pixels:
        raise bad_image("IMAGE_TOO_LARGE", f"{width}x{height} px exceeds the limit of {max_pixels} pixels ({whose})", field)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 RGB (H, W, 3)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: keep the full range, scaled to 8 bits (Pillow's convert("L") clips instead).
        grey = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if grey.max() > 255 or image.mode.startswith("I;16") else 255.0
        grey = np.clip(grey / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(black, rgba).convert("RGB"))
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # no copy to convert RGB to RGB


def heatmap_pngs(rgb: np.ndarray, heatmap: np.ndarray) -> tuple[bytes, bytes]:
    """An explanation's heatmap (float (H, W) in [0, 1]) as PNGs: the heatmap alone (8-bit
    grey) and blended over the image in colour (blue-yellow-red, opaque where it is hot)."""
    if heatmap.shape != rgb.shape[:2]:
        raise ValueError(f"the heatmap is {heatmap.shape}, the image {rgb.shape[:2]}")
    heat = Image.fromarray(np.round(np.clip(np.nan_to_num(heatmap), 0.0, 1.0) * 255).astype(np.uint8))
    colour = ImageOps.colorize(heat, black="blue", mid="yellow", white="red")
    opacity = heat.point(lambda v: int(v * 0.6))  # the cell stays visible under the hottest spot
    overlay = Image.composite(colour, Image.fromarray(rgb), opacity)
    return _png(heat), _png(overlay)


def mask_png(mask: np.ndarray) -> bytes:
    """A bool mask as an 8-bit grey PNG, 255 = inside (zlib level 1: a mask is a few hundred bytes
    at any level, and level 6 took twice the time)."""
    return _png(Image.fromarray((np.asarray(mask) != 0).view(np.uint8) * np.uint8(255)), compress_level=1)


def raw_image(rgb: np.ndarray) -> pb.Image:
    """A uint8 RGB array as a request's raw image (no encoding: the pixels as they are)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    return pb.Image(raw=pb.RawImage(pixels=rgb.tobytes(), width=rgb.shape[1], height=rgb.shape[0], channels=3))


def _png(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()
