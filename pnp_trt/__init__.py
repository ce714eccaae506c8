"""pnp-trt: Plug-and-Play Diffusion Features image translation on PyTorch, ONNX Runtime and TensorRT.

The public API is torch-free to import (the ONNX Runtime path must not pay for torch): a server embeds
`Translator.open(backend, model=..., engines=...)`; `translate(model, prompts, config, image=...)` is the
one-call form over a model from `open_model(backend, model, engines)`.
"""

from .config import TranslateConfig
from .errors import PnPError
from .runtime.cache import SourceCache
from .runtime.loading import open_model
from .runtime.translation import Translation, translate
from .runtime.translator import Translator

__all__ = ["PnPError", "SourceCache", "TranslateConfig", "Translation", "Translator", "open_model",
           "translate"]
__version__ = "0.1.0"
