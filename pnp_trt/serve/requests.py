"""One translation request as every server surface checks it (the HTTP form, Triton's tensors): settings by the
CLI's rules and the server's limits, prompts, exactly one guidance, the image decoded within its limits, the
output size; and the key of the requests that may share one translation."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from .. import validation
from ..config import GENERATION_ONLY, GENERATION_SETTINGS, TranslateConfig
from ..errors import PnPError
from ..images import (
    GUIDANCE_FORMATS,
    Guidance,
    check_decoded,
    check_structure,
    header_megapixels,
    normalize_guidance,
)
from ..runtime.translation import Translation, plan_size
from .batching import group_key
from .limits import RequestError, ServeLimits, check_prompts, check_text, settings_from_form


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every check: what to translate, and the key it shares a translation by."""

    prompts: list[str]
    config: TranslateConfig
    image: Guidance | None
    """Checked once here: the translator does not normalise it again."""
    source_prompt: str | None
    key: str


def check_request(fields: dict[str, str], prompts: list[str], image_data: bytes | None, model: Any,
                  limits: ServeLimits) -> CheckedRequest:
    """`fields`: the settings as text (and `source_prompt`); `image_data`: the image file's bytes, or None.
    Every refusal is a `RequestError` with its HTTP status and one line."""
    fields = dict(fields)
    source_prompt = fields.pop("source_prompt", None)
    check_text({"source_prompt": source_prompt or ""})
    config = settings_from_form(fields, limits)
    check_prompts(prompts, limits)
    if (image_data is None) == (source_prompt is None):
        raise RequestError(422, "give exactly one guidance: an image or a source_prompt")
    unused = [name for name in GENERATION_SETTINGS if fields.get(name, "") != ""] if image_data is not None else []
    if unused:
        raise RequestError(422, f"{unused[0]} {GENERATION_ONLY}")
    if source_prompt is not None:
        try:
            validation.text("source_prompt", source_prompt, non_blank=True)  # the rule translate() applies
        except PnPError as exc:
            raise RequestError.of(exc) from None
    image = Guidance(decode_image(image_data, limits)) if image_data is not None else None
    try:
        limits.output.check_output(*plan_size(model, config, image.image if image else None), model.dims.native_size)
    except PnPError as exc:
        raise RequestError.of(exc) from None
    return CheckedRequest(prompts, config, image, source_prompt,
                          group_key(image_data or b"", source_prompt, config.to_dict()))


def decode_image(data: bytes, limits: ServeLimits) -> Image.Image:
    """The image as upright RGB; not an image → 415, too many pixels (read from the header) → 413."""
    try:
        opened = Image.open(io.BytesIO(data), formats=GUIDANCE_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own refusal, from the header, past ~179 Mpx
        raise RequestError(413, f"the image is over this server's {limits.max_input_pixels / 1e6:g} Mpx limit "
                                f"(its header says {header_megapixels(exc)}); downscale it first") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(415, "the image is not an image this server reads; send a PNG, JPEG or WebP file") \
            from None
    width, height = opened.size
    if width * height > limits.max_input_pixels:
        raise RequestError(413, f"the image is {width}x{height}, over this server's "
                                f"{limits.max_input_pixels / 1e6:g} Mpx limit; downscale it first")
    try:
        check_structure(opened, io.BytesIO(data), "the upload")  # the checks a file on the CLI gets
        opened.load()
        check_decoded(opened, "the upload")
    except PnPError as exc:
        raise RequestError.of(exc, 415) from None
    except (OSError, ValueError, SyntaxError):
        raise RequestError(415, "the image file is truncated or corrupt; send a valid PNG, JPEG or WebP file") \
            from None
    return normalize_guidance(opened, "upload")


def share_of(result: Translation, part: slice) -> Translation:
    """One request's images out of a shared translation (the rest of the record is the group's)."""
    return dataclasses.replace(result, images=result.images[part], prompts=result.prompts[part],
                               latents=result.latents[part])
