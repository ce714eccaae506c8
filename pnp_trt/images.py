"""Guidance-image loading (any mode Pillow reads), output sizing, array conversion, atomic PNG writes."""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from . import validation
from .contract import SIZE_MULTIPLE
from .errors import PnPError
from .png_chunks import chunks, damage

MIN_SIDE = SIZE_MULTIPLE
SHORT_SIDE = 512
MAX_PIXELS = 50_000_000
"""Largest guidance image read (an 8K photo is 33 Mpx): a larger header is refused before decoding."""
ORIENTATION_TAG = 0x0112
"""EXIF Orientation: 1 to 8, the eight ways a camera held the picture."""


GUIDANCE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF", "PPM", "TGA", "ICO", "JPEG2000")
"""What a guidance may be. Not EPS/PS (Pillow runs Ghostscript on them: an outside program on a user's file)."""
NO_BRIGHTNESS_RANGE = {"I": "32-bit integer", "F": "32-bit float"}
"""Modes whose values have no standard black and white: stretching them to their own maximum turned a
near-black picture white; refused instead."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode: 16-bit greyscale rescaled, transparency composited over white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        image = Image.fromarray(_to_8bit(np.asarray(image), 65535.0), "L")
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts it only to its straight form
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _to_8bit(values: np.ndarray, top: float) -> np.ndarray:
    """Greyscale of any depth → uint8, `top` mapped to 255; in float32 row bands of 256 rows, so the
    conversion needs about twice the image's size, not twelve times."""
    out = np.empty(values.shape, np.uint8)
    for row in range(0, values.shape[0], 256):
        band = values[row:row + 256].astype(np.float32)
        out[row:row + 256] = np.clip(band * np.float32(255.0 / top) + np.float32(0.5), 0, 255)
    return out


def load_guidance(path: Path | str) -> Image.Image:
    """The guidance image from a file, as `normalize_guidance` gives it; a clear error for missing or
    unreadable files."""
    given, path = os.fspath(path), Path(path)
    if not given:
        raise PnPError("the guidance image's path is empty; pass the path of a PNG/JPEG image")
    try:
        mode = os.stat(given).st_mode  # one look, through links (a dangling link does not exist either), as
        # typed: "photo.png/" names a directory, and is refused as the system refuses it
    except FileNotFoundError:
        raise PnPError(f"guidance image {path} does not exist; pass the path of a PNG/JPEG image") from None
    except OSError as exc:  # a name too long, a path through a file, ...
        raise PnPError(f"cannot read guidance image {str(path)[:80]} ({exc.strerror}); pass the path of a "
                       "PNG/JPEG image") from None
    if stat.S_ISDIR(mode):
        raise PnPError(f"guidance image {path} is a directory; pass the path of a PNG/JPEG image")
    if not stat.S_ISREG(mode):
        raise PnPError(f"guidance image {path} is not a regular file (a FIFO or device); pass the path of a "
                       "PNG/JPEG image")
    return _open_checked(path, f"guidance image {path}")


def header_megapixels(bomb: Image.DecompressionBombError) -> str:
    """The size Pillow read from a header it refused (its message says the pixels), as "N Mpx"."""
    found = re.search(r"\((\d+) pixels\)", str(bomb))
    return f"{int(found[1]) / 1e6:.6g} Mpx" if found else "over 179 Mpx"


def _open_checked(source: Path | IO[bytes], name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():  # our own pixel limit answers, before Pillow's bomb warning matters
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source, formats=GUIDANCE_FORMATS)
        with opened:
            _check_size(opened, name)
            check_structure(opened, source, name)
            opened.load()
            check_decoded(opened, name)
            return normalize_guidance(opened, name)
    except Image.DecompressionBombError as exc:  # Pillow's own refusal, from the header, past ~179 Mpx
        raise PnPError(f"{name} is {header_megapixels(exc)} (its header says so); the limit is "
                       f"{MAX_PIXELS / 1e6:.0f} Mpx: downscale it first") from None
    except UnidentifiedImageError:  # Pillow's message names its file object ("<_io.BytesIO object at 0x…>")
        raise PnPError(f"cannot read {name} as an image (not a PNG, JPEG or WebP file, or empty); pass a valid "
                       "PNG/JPEG/WebP file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        detail = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise PnPError(f"cannot read {name} as an image ({detail}); pass a valid PNG/JPEG/WebP file") from None


def _png_bytes(source: Path | IO[bytes]) -> bytes:
    """The whole file a PNG guidance was opened from (its chunks are checked before Pillow decodes it)."""
    if isinstance(source, Path):
        return source.read_bytes()
    position = source.tell()
    source.seek(0)
    data = source.read()
    source.seek(position)
    return data


def check_structure(opened: Image.Image, source: Path | IO[bytes], name: str) -> None:
    """What Pillow would decode although the file is damaged (checked before decoding, for every surface)."""
    if opened.format == "PNG":
        _check_png(source, name)


def check_decoded(opened: Image.Image, name: str) -> None:
    """What a decoded image shows of its file's damage."""
    if opened.mode == "P" and opened.palette is None:
        raise PnPError(f"{name} is a palette image without its palette (a PNG missing its PLTE chunk: a "
                       "damaged file); re-save it")


def _check_png(source: Path | IO[bytes], name: str) -> None:
    data = _png_bytes(source)
    if [kind for kind, _ in chunks(data)[:1]] == [b"CgBI"]:
        raise PnPError(f"{name} is an Apple CgBI PNG (an iOS app resource, not a standard PNG); convert it to a "
                       "standard PNG first")
    problem = damage(data)
    if problem:
        raise PnPError(f"{name} is a damaged PNG ({problem}); re-save or re-export it")


@dataclass(frozen=True)
class Guidance:
    """A checked guidance: upright RGB pixels, and the file they were read from (None: not from a file)."""

    image: Image.Image
    file: str | None = None


def check_guidance(value: object) -> Guidance:
    """The one check of what a user may pass as the guidance (every surface calls it once): a path (str or
    Path), a PIL image, the bytes of an image file, a uint8 array H×W×3 (RGB), H×W×4 (RGBA) or H×W (grey), or
    a `Guidance` already checked; anything else is one line."""
    if isinstance(value, Guidance):
        return value
    if isinstance(value, os.PathLike) and not isinstance(value, Path):
        value = os.fspath(value)
    if isinstance(value, (str, Path)):
        validation.path("the guidance image's path", value)
        return Guidance(load_guidance(value), str(value))  # as given: Path() would drop a final "/"
    if isinstance(value, Image.Image):
        try:
            value.load()  # a closed or truncated image fails here, not as "damaged EXIF" further on
        except (ValueError, OSError) as exc:
            raise PnPError(f"the guidance image cannot be read ({str(exc)[:80]}); pass an open, complete PIL "
                           "image") from None
        return Guidance(normalize_guidance(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) < 4096 and b"\0" not in data and os.path.lexists(os.fsdecode(data)):
            raise PnPError("the image bytes are a file's path, and bytes are read as an image file's contents; pass "
                           "the path as a str or Path")
        return Guidance(decode_guidance(data))
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and (
            value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (3, 4))):
        _check_sides(value.shape[1], value.shape[0], "the array")  # before Pillow copies it
        return Guidance(normalize_guidance(Image.fromarray(value), "the array"))
    shown = f"an array of {value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
    raise PnPError(f"the guidance image must be a path, a PIL image, an image file's bytes or a uint8 array "
                   f"H×W×3 (RGB, 0-255), H×W×4 (RGBA) or H×W (grey), got {shown}")


def decode_guidance(data: bytes, name: str = "the image bytes") -> Image.Image:
    """An image file held in memory, checked from its header before decoding, as for a file."""
    return _open_checked(io.BytesIO(data), name)


def normalize_guidance(image: Image.Image, name: str = "the guidance image") -> Image.Image:
    """Any guidance (file or PIL image) as upright RGB: EXIF orientation applied first (a phone photo
    stored sideways), any mode converted; too small or too large, several frames or pixels without a
    brightness range are a clear error."""
    _check_size(image, name)
    frames = int(getattr(image, "n_frames", 1))
    if frames > 1:
        raise PnPError(f"{name} has {frames} frames (animated or multi-page); pnp-trt translates one "
                       "still image: save the frame you want as a PNG first")
    if image.mode in NO_BRIGHTNESS_RANGE:
        raise PnPError(f"{name} is a {NO_BRIGHTNESS_RANGE[image.mode]} image, whose brightness has no standard "
                       "range; convert it to an 8- or 16-bit image first")
    return _to_rgb(_upright(image, name))


def _upright(image: Image.Image, name: str) -> Image.Image:
    """EXIF orientation applied; an EXIF block Pillow cannot parse is ignored, with a warning."""
    try:
        orientation = image.getexif().get(ORIENTATION_TAG)
        if orientation is not None and orientation not in range(1, 9):
            warnings.warn(f"{name} has an EXIF orientation of {str(orientation)[:20]}, which means nothing "
                          "(1 to 8 do); it is ignored", RuntimeWarning, stacklevel=3)
            return image
        return ImageOps.exif_transpose(image)
    except Exception:  # Pillow raises struct.error, TypeError, ... on damaged EXIF
        warnings.warn(f"{name} has damaged EXIF data; its orientation tag is ignored", RuntimeWarning,
                      stacklevel=3)
        return image


def _check_size(image: Image.Image, name: str) -> None:
    _check_sides(*image.size, name)


def _check_sides(width: int, height: int, name: str) -> None:
    if min(width, height) < MIN_SIDE:
        raise PnPError(f"{name} is {width}×{height}; both sides must be at least {MIN_SIDE} px")
    if width * height > MAX_PIXELS:
        raise PnPError(f"{name} is {width}×{height} ({width * height / 1e6:.0f} Mpx); "
                       f"the limit is {MAX_PIXELS / 1e6:.0f} Mpx: downscale it first")


def output_size(width: int, height: int, out_height: int | None, out_width: int | None,
                multiple: int = SIZE_MULTIPLE, short_side: int = SHORT_SIDE) -> tuple[int, int]:
    """(height, width): the given sides, else the aspect ratio kept with `short_side` (the model's native size),
    multiples of `multiple` (the model's; 64 for every SD 1.x/2.x)."""
    if out_height and out_width:
        return out_height, out_width
    if out_height or out_width:
        scale = (out_height / height) if out_height else (out_width / width)  # type: ignore[operator]
    else:
        scale = short_side / min(width, height)
    h = out_height or max(multiple, round(height * scale / multiple) * multiple)
    w = out_width or max(multiple, round(width * scale / multiple) * multiple)
    return h, w


def to_array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """[1,3,H,W] float32 in [0,1], resized with Lanczos when the size differs."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None].copy()


def to_pil(array: np.ndarray) -> Image.Image:
    """[3,H,W] in [0,1] → 8-bit RGB (rounded)."""
    pixels = np.clip(np.rint(np.asarray(array, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels.transpose(1, 2, 0), "RGB")


def write_png(image: Image.Image, target: Path | IO[bytes], text: Mapping[str, str] | None = None) -> None:
    """Encode `image` as PNG into `target`; `text`: tEXt chunks (key → value) it carries."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    image.save(target, format="PNG", pnginfo=info)


def png_bytes(image: Image.Image) -> bytes:
    """The image encoded as a PNG file, in memory (HTTP answers, Ray messages)."""
    buffer = io.BytesIO()
    write_png(image, buffer)
    return buffer.getvalue()
