"""Is TensorRT usable here? (a CUDA GPU and the real `tensorrt` package, not only its type stubs)"""

from __future__ import annotations

from ..errors import PnPError

INSTALL = ("on a CUDA machine: `pip install tensorrt` (TensorRT 10.x/11.x wheels from NVIDIA's package index) "
           "and a CUDA build of torch")


def missing_tensorrt() -> str | None:
    """What is missing for the TensorRT path, or None when it can run."""
    try:
        import tensorrt
    except ImportError:
        return "TensorRT is not installed"
    if not hasattr(tensorrt, "Builder"):  # `tensorrt-stubs` leaves an importable namespace with no API
        return "TensorRT is not installed (only its type stubs are)"
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None


def require_tensorrt(what: str) -> None:
    missing = missing_tensorrt()
    if missing:
        raise PnPError(f"{what} needs TensorRT and a CUDA GPU: {missing}; {INSTALL}")
