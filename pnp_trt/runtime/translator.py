"""`Translator`: load once, translate from many threads, reuse each source's captured features."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..config import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_DISK_CACHE_BYTES,
    GENERATION_ONLY,
    GENERATION_SETTINGS,
    Limits,
    TranslateConfig,
    in_keywords,
)
from ..destination import check_cache_home
from ..errors import PnPError
from ..images import Guidance, check_guidance
from .backend import LoadedModel
from .cache import SourceCache
from .loading import open_model
from .sampler import Progress, no_progress
from .translation import Translation, translate

OPEN_KEYWORDS = {"backend": "backend", "model": "model", "engines": "engines", "provider": "provider",
                 "cache-dir": "cache_dir", "injection-preset": "injection_preset",
                 "no-cuda-graphs": "cuda_graphs=False"}
"""`Translator.open`'s keywords for the CLI flags its loaders' refusals name."""


class Translator:
    """Thread-safe: calls run concurrently where the backend allows it (torch, ONNX Runtime: all per-call
    state is local); a TensorRT backend owns one execution context and activation region, so its calls
    take turns."""

    def __init__(self, model: LoadedModel, cache: SourceCache | None = None, limits: Limits | None = None):
        self.model, self.limits = model, limits or Limits()
        self.cache = cache if cache is not None else SourceCache()
        self._turns = None if model.backend.concurrent_calls else threading.Lock()

    @classmethod
    def open(cls, backend: str = "torch", model: str | Path | None = None, engines: Path | str | None = None,
             provider: str = "cpu", cache_bytes: int = DEFAULT_CACHE_BYTES,
             cache_dir: Path | str | None = None, cuda_graphs: bool = True,
             cache_dir_bytes: int = DEFAULT_DISK_CACHE_BYTES, limits: Limits | None = None,
             injection_preset: str | None = None) -> Translator:
        """Load a model (torch: hub id or diffusers dir; onnxruntime/tensorrt: an exported directory);
        `injection_preset`: see `open_model`."""
        if limits is not None and not isinstance(limits, Limits):
            raise PnPError(f"limits must be a pnp_trt.config.Limits, got {type(limits).__name__}")
        if cache_dir is None and cache_dir_bytes != DEFAULT_DISK_CACHE_BYTES:  # as the CLI refuses --cache-dir-gib
            raise PnPError("cache_dir_bytes is the budget of cache_dir, and no cache_dir is given; pass both or "
                           "neither")
        try:
            if cache_dir is not None:
                check_cache_home(cache_dir, engines)
            cache = SourceCache(cache_bytes, cache_dir, cache_dir_bytes)
            return cls(open_model(backend, model, engines, provider, cuda_graphs, injection_preset), cache, limits)
        except PnPError as exc:  # the loaders speak the CLI's flags; a caller passes these keywords
            raise PnPError(in_keywords(str(exc), OPEN_KEYWORDS)) from None

    def translate(self, prompts: Sequence[str] | str, image: Guidance | Image.Image | str | Path | bytes | None = None,
                  source_prompt: str | None = None, progress: Progress = no_progress,
                  decode_guidance: bool = False, **settings: Any) -> Translation:
        """Translate `image` (a path, PIL image, image file bytes, uint8 array or checked `Guidance`; or a
        guidance generated from `source_prompt`) into every prompt.

        `settings` are `TranslateConfig` fields (steps, guidance_scale, feature_injection, ...); `progress` is
        called per stage and step (an exception raised there stops the translation); `decode_guidance` also
        decodes a generated guidance (`Translation.guidance_image`)."""
        config = TranslateConfig.of(settings)
        defaults = TranslateConfig()  # a default passed on (as the CLI and servers do) changes nothing
        unused = [name for name in GENERATION_SETTINGS
                  if image is not None and getattr(config, name) != getattr(defaults, name)]
        if unused:
            raise PnPError(f"{unused[0]} {GENERATION_ONLY}")
        guidance = check_guidance(image) if image is not None else None  # decoded before taking a turn
        with self._turns or contextlib.nullcontext():
            return translate(self.model, prompts, config, image=guidance, source_prompt=source_prompt,
                             progress=progress, cache=self.cache, limits=self.limits, decode_guidance=decode_guidance)
