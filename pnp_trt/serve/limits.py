"""What a server accepts per request, and the form fields of a translation request turned into settings with
the same validation and wording as the CLI (`TranslateConfig`)."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import Limits, TranslateConfig
from ..errors import PnPError


@dataclass(frozen=True)
class ServeLimits:
    """Per-request bounds (each a `pnp-trt serve` flag): safe defaults for a shared GPU server."""

    max_upload_bytes: int = 20 * 2**20
    max_input_pixels: int = 16_000_000
    max_prompts: int = 8
    max_steps: int = 100
    queue_length: int = 16
    """Requests waiting or running at once; more are answered 429 with Retry-After."""
    deadline_s: float = 120.0
    """A request still unanswered after this long is answered 504 (its work stops at the next step)."""
    output: Limits = Limits()


class RequestError(PnPError):
    """A request the server refuses: `status` is the HTTP status, the message one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _field_types() -> dict[str, type]:
    """Each `TranslateConfig` field's value type (`int | None` → int)."""
    types_ = {}
    for name, hint in typing.get_type_hints(TranslateConfig).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        types_[name] = args[0] if isinstance(hint, types.UnionType) else hint
    return types_


FIELD_TYPES = _field_types()


def settings_from_form(fields: Mapping[str, str], limits: ServeLimits) -> TranslateConfig:
    """A `TranslateConfig` from form fields (strings), validated as the CLI validates its flags; unknown fields,
    unparsable values and values past the server's limits are 422s naming the field."""
    unknown = sorted(set(fields) - set(FIELD_TYPES))
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(unknown)}; settings are {', '.join(FIELD_TYPES)}")
    values: dict[str, Any] = {}
    for name, text in fields.items():
        kind = FIELD_TYPES[name]
        if text == "" and kind is not str:
            continue
        try:
            values[name] = kind(text)
        except ValueError:
            raise RequestError(422, f"{name} must be {kind.__name__}, got {text!r}") from None
    try:
        config = TranslateConfig(**values)
    except PnPError as exc:
        raise RequestError(422, str(exc)) from None
    for name, value in (("steps", config.steps), ("inversion_steps", config.effective_inversion_steps)):
        if value > limits.max_steps:
            raise RequestError(422, f"{name} {value} is over this server's limit of {limits.max_steps}")
    return config


def check_prompts(prompts: list[str], limits: ServeLimits) -> list[str]:
    if not prompts or not all(p.strip() for p in prompts):
        raise RequestError(422, "give at least one non-empty prompt field")
    if len(prompts) > limits.max_prompts:
        raise RequestError(422, f"{len(prompts)} prompts is over this server's limit of {limits.max_prompts} "
                                "per request")
    return prompts
