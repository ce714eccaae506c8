"""Is TensorRT usable here? (a CUDA GPU and the real `tensorrt` package, not only its type stubs)"""

from __future__ import annotations

from ..errors import PnPError

INSTALL = ("on a CUDA machine: `pip install tensorrt` (TensorRT 10.1 or newer, 10.x/11.x wheels from NVIDIA's "
           "package index) and a CUDA build of torch")
MIN_TENSORRT = (10, 1)
"""`set_device_memory` and `device_memory_size_v2`, which the runtime uses, arrived in TensorRT 10.1."""
TENSORRT_ATTENTION = (10, 14)
"""The first TensorRT whose ONNX parser reads the standard `Attention` op (into its fused `IAttention` layer)."""


def tensorrt_release(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as '10.13.2.6'."""
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major) if major.isdigit() else 0, int(minor) if minor.isdigit() else 0


def missing_tensorrt() -> str | None:
    """What is missing for the TensorRT path, or None when it can run."""
    try:
        import tensorrt
    except ImportError:
        return "TensorRT is not installed"
    if not hasattr(tensorrt, "Builder"):  # `tensorrt-stubs` leaves an importable namespace with no API
        return "TensorRT is not installed (only its type stubs are)"
    if tensorrt_release(tensorrt.__version__) < MIN_TENSORRT:
        return f"TensorRT {tensorrt.__version__} is older than {'.'.join(map(str, MIN_TENSORRT))}"
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
