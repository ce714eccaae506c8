"""The Triton model's I/O, as data: its inputs and outputs (names, types, shapes) for `config.pbtxt`, and the
conversions between a request's tensors and what `requests.check_request` takes, and a translation and the
response's tensors. Pure numpy: the Triton-only part is `triton_model.py`.

Every tensor has Triton's leading batch axis (the dynamic batcher is on); a request is one translation, so
that axis is 1: IMAGE [1, 1] (the encoded file's bytes) or SOURCE_PROMPT [1, 1], PROMPT [1, N], each setting
[1, 1]; IMAGES [1, N] (one PNG per prompt, in order) and RECORD [1, 1] (the JSON record a CLI run writes)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..images import png_bytes
from ..runtime.translation import Translation
from .limits import FIELD_TYPES, RequestError

TRITON_TYPES = {int: "TYPE_INT64", float: "TYPE_FP32", str: "TYPE_STRING"}


@dataclass(frozen=True)
class TensorIO:
    name: str
    data_type: str
    dims: tuple[int, ...] = (1,)
    optional: bool = True

    @property
    def setting(self) -> str:
        """The request field it carries (`STEPS` → `steps`)."""
        return self.name.lower()


INPUTS = (TensorIO("IMAGE", "TYPE_STRING"), TensorIO("SOURCE_PROMPT", "TYPE_STRING"),
          TensorIO("PROMPT", "TYPE_STRING", (-1,), optional=False),
          *(TensorIO(name.upper(), TRITON_TYPES[kind]) for name, kind in FIELD_TYPES.items()))
"""The guidance (exactly one of IMAGE, SOURCE_PROMPT), the prompts, then every `TranslateConfig` setting."""
OUTPUTS = (TensorIO("IMAGES", "TYPE_STRING", (-1,), optional=False), TensorIO("RECORD", "TYPE_STRING",
                                                                                optional=False))
NOT_FIELDS = {"IMAGE", "PROMPT"}
"""Inputs that are not text fields of the request: the image file's bytes, the list of prompts."""


def request_fields(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, str], list[str], bytes | None]:
    """A request's tensors (None-free: absent inputs left out) as `check_request`'s arguments: settings and
    SOURCE_PROMPT as text, the prompts, the image bytes."""
    for name, array in arrays.items():
        if array.ndim != 2 or array.shape[0] != 1:
            raise RequestError(400, f"{name} has shape {list(array.shape)}; each request is one translation: "
                                    "send [1, 1] (PROMPT: [1, number of prompts])")
    fields = {io.setting: _one(io.name, arrays[io.name]) for io in INPUTS
              if io.name in arrays and io.name not in NOT_FIELDS}
    prompts = [_text("PROMPT", value) for value in arrays["PROMPT"][0]] if "PROMPT" in arrays else []
    image = _bytes("IMAGE", arrays["IMAGE"]) if "IMAGE" in arrays else None
    return fields, prompts, image


def _one(name: str, array: np.ndarray) -> str:
    if array.shape[1] != 1:
        raise RequestError(400, f"{name} holds {array.shape[1]} values; send one")
    value = array[0, 0]
    return _text(name, value) if isinstance(value, (bytes, np.bytes_, str)) else str(value.item())


def _text(name: str, value: object) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")  # type: ignore[call-overload]
    except UnicodeDecodeError:
        raise RequestError(400, f"{name} is not UTF-8 text; send text as UTF-8") from None


def _bytes(name: str, array: np.ndarray) -> bytes:
    if array.shape[1] != 1:
        raise RequestError(400, f"{name} holds {array.shape[1]} images; send one guidance image per request")
    value = array[0, 0]
    return value if isinstance(value, bytes) else bytes(value)


def response_arrays(result: Translation) -> dict[str, np.ndarray]:
    """IMAGES (PNG bytes, one per prompt) and RECORD (the JSON record), with the batch axis."""
    images = np.array([[png_bytes(image) for image in result.images]], dtype=np.object_)
    record = np.array([[json.dumps(result.record).encode()]], dtype=np.object_)
    return {"IMAGES": images, "RECORD": record}
