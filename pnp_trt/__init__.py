"""pnp-trt: Plug-and-Play Diffusion Features image translation on PyTorch, ONNX Runtime and TensorRT.

The public API is torch-free to import (the ONNX Runtime path must not pay for torch):
`translate(model, prompts, config, image=...)` over a model from `open_model(backend, model, engines)`.
"""

from .config import TranslateConfig
from .errors import PnPError
from .runtime.loading import open_model
from .runtime.translate import TranslateResult, translate

__all__ = ["PnPError", "TranslateConfig", "TranslateResult", "open_model", "translate"]
__version__ = "0.1.0"
