"""pnp-trt: Plug-and-Play Diffusion Features image translation on PyTorch, ONNX Runtime and TensorRT.

The public API is torch-free to import (the ONNX Runtime path must not pay for torch): a server embeds
`Translator.open(backend, model=..., engines=...)`; `translate(model, prompts, image=..., steps=...)` is the
one-call form over a model from `open_model(backend, model, engines)`. Names are imported on first use, so
`import pnp_trt` itself costs nothing (the console script handles Ctrl-C from its first moment).
"""

from __future__ import annotations

TYPE_CHECKING = False
"""typing.TYPE_CHECKING without importing typing (15 ms): the console script installs its signal handlers only
after this package is imported, and a Ctrl-C before that prints Python's traceback."""
if TYPE_CHECKING:
    from typing import Any

    from .config import TranslateConfig
    from .errors import PnPError
    from .runtime.cache import SourceCache
    from .runtime.loading import open_model
    from .runtime.translation import Translation, translate
    from .runtime.translator import Translator

_HOMES = {"TranslateConfig": ".config", "PnPError": ".errors", "SourceCache": ".runtime.cache",
          "open_model": ".runtime.loading", "Translation": ".runtime.translation", "translate": ".runtime.translation",
          "Translator": ".runtime.translator"}
__all__ = ["PnPError", "SourceCache", "TranslateConfig", "Translation", "Translator", "open_model",
           "translate"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    import importlib

    if name not in _HOMES:
        raise AttributeError(f"module 'pnp_trt' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
