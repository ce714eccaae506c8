"""How a server is configured (`ServeOptions`), what it accepts per request (`ServeLimits`), and the form
fields of a request turned into settings with the CLI's validation and wording (`TranslateConfig`)."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import validation
from ..config import Limits, TranslateConfig
from ..errors import PnPError

if TYPE_CHECKING:
    from ..runtime.translator import Translator


def server_output_limit(max_output_pixels: int | None = None) -> Limits:
    """The output limit as a server holds it: its refusal tells the client what to ask for instead."""
    return Limits(max_output_pixels, over_hint="ask for a smaller height and width (the limit is this server's)")


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
    output: Limits = server_output_limit()


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """What a server (each replica, on Ray) loads and how it serves: `pnp-trt serve`'s flags, and the keys
    of the Ray Serve application (`ray_app.application`). Keywords only: two adjacent numbers swapped by
    position would pass silently."""

    backend: str = "onnxruntime"
    model: str | None = None
    engines: str | None = None
    provider: str = "cpu"
    cuda_graphs: bool = True
    injection_preset: str | None = None
    cache_dir: str | None = None
    """A directory every replica can reach (a shared file system): replicas then share captured sources."""
    replicas: int = 1
    gpus_per_replica: float = 0.0
    coalesce_ms: float = 10.0
    workers: int = 1
    max_upload_mb: float = ServeLimits.max_upload_bytes / 2**20
    max_input_mpx: float = ServeLimits.max_input_pixels / 1e6
    max_output_mpx: float | None = None
    """None: the model's default (`config.default_output_pixels`)."""
    max_prompts: int = ServeLimits.max_prompts
    max_steps: int = ServeLimits.max_steps
    queue: int = ServeLimits.queue_length
    deadline_s: float = ServeLimits.deadline_s

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> ServeOptions:
        """From `serve run`'s key=value strings (or a config file's values)."""
        types_ = value_types(cls)
        unknown = sorted(set(args) - set(types_))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(types_)}")
        return cls(**{name: _parse(types_[name], value) for name, value in args.items()})

    def limits(self) -> ServeLimits:
        return ServeLimits(max_upload_bytes=int(self.max_upload_mb * 2**20),
                           max_input_pixels=int(self.max_input_mpx * 1e6), max_prompts=self.max_prompts,
                           max_steps=self.max_steps, queue_length=self.queue, deadline_s=self.deadline_s,
                           output=server_output_limit(None if self.max_output_mpx is None
                                                      else int(self.max_output_mpx * 1e6)))

    def load(self) -> Translator:
        from ..runtime.cache import SourceCache
        from ..runtime.loading import open_model
        from ..runtime.translator import Translator

        model = open_model(self.backend, self.model, self.engines, self.provider, self.cuda_graphs,
                           self.injection_preset)  # not Translator.open: a server's operator reads CLI flags
        return Translator(model, SourceCache(directory=self.cache_dir), self.limits().output)


def _parse(kind: type, value: Any) -> Any:
    if value is None or isinstance(value, kind):
        return value
    if kind is bool:
        return str(value).lower() in ("1", "true", "yes", "on")
    return kind(value)


class RequestError(PnPError):
    """A request the server refuses: `status` is the HTTP status, the message one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    @classmethod
    def of(cls, exc: Exception, status: int = 422) -> RequestError:
        """A library refusal as this server's client reads it (`client_words`), with its status."""
        return cls(status, client_words(exc))


def client_words(exc: Exception) -> str:
    """An error as a server's client reads it, over HTTP and Triton alike: its first line, each setting by its
    form field's name (`steps`, not `--steps`)."""
    text = str(exc)
    return TranslateConfig.field_wording(text.splitlines()[0]) if text else type(exc).__name__


def value_types(cls: Any) -> dict[str, type]:
    """Each field of a dataclass with its value type (`int | None` → int): how form and key=value strings
    are parsed."""
    found = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        found[name] = args[0] if isinstance(hint, types.UnionType) else hint
    return found


FIELD_TYPES = value_types(TranslateConfig)



def settings_from_form(fields: Mapping[str, str], limits: ServeLimits) -> TranslateConfig:
    """A `TranslateConfig` from form fields (strings), validated as the CLI validates its flags; unknown fields,
    unparsable values and values past the server's limits are 422s naming the field."""
    unknown = sorted(set(fields) - set(FIELD_TYPES))
    check_text(fields)
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(unknown)}; settings are {', '.join(FIELD_TYPES)}")
    values: dict[str, Any] = {}
    for name, text in fields.items():
        kind = FIELD_TYPES[name]
        if text == "" and kind is not str:
            continue
        try:
            values[name] = validation.number_text(kind, text) if kind in (int, float) else kind(text)
        except ValueError:
            raise RequestError(422, f"{name} must be {kind.__name__}, got {text!r}") from None
    try:
        config = TranslateConfig(**values)
    except PnPError as exc:
        raise RequestError.of(exc) from None
    for name, value in (("steps", config.steps), ("inversion_steps", config.effective_inversion_steps)):
        if value > limits.max_steps:
            raise RequestError(422, f"{name} {value} is over this server's limit of {limits.max_steps}")
    return config


def check_text(fields: Mapping[str, str]) -> None:
    """Every text field within the one text limit (`validation.text`'s), before anything parses it."""
    for name, text in fields.items():
        try:
            validation.text(name, text)
        except PnPError as exc:
            raise RequestError.of(exc) from None


def check_prompts(prompts: list[str], limits: ServeLimits) -> list[str]:
    if not prompts:
        raise RequestError(422, "give at least one non-empty prompt field")
    try:
        validation.prompts(prompts)  # the rule every surface follows
    except PnPError as exc:
        raise RequestError.of(exc) from None
    if len(prompts) > limits.max_prompts:
        raise RequestError(422, f"{len(prompts)} prompts is over this server's limit of {limits.max_prompts} "
                                "per request")
    return prompts
