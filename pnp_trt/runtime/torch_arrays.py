"""The array side of every backend whose arrays are torch tensors (torch, TensorRT, ONNX Runtime on a GPU):
one dtype map, one way to move arrays, one notion of the device's free memory."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from ..contract import FLOAT, TensorSpec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "bool": torch.bool}
NUMPY_DTYPES = {dtype: np.dtype(name).type for name, dtype in TORCH_DTYPES.items()}
"""torch dtype → numpy scalar type (e.g. ONNX Runtime's IO binding names element types this way)."""

_WORKER = threading.local()
"""Per thread: its own CUDA stream per device (`TorchArrays.worker_stream`)."""


def worker_cuda_stream(device: torch.device) -> torch.cuda.Stream:
    """The calling thread's own stream on `device`, made on first use (never the legacy default stream)."""
    streams = _WORKER.__dict__.setdefault("streams", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


class TorchArrays:
    """`Backend`'s array operations over tensors on `device`; floats in `dtype` (the graphs' precision)."""

    device: torch.device
    dtype: torch.dtype

    def dtype_of(self, tensor: TensorSpec) -> torch.dtype:
        """The torch dtype of a contract tensor in this backend's precision."""
        return self.dtype if tensor.dtype == FLOAT else TORCH_DTYPES[tensor.dtype]

    def allocate(self, tensor: TensorSpec, shape: tuple[int, ...], zero: bool = False) -> torch.Tensor:
        """Device memory for a contract tensor of this shape (zero-filled if asked)."""
        return (torch.zeros if zero else torch.empty)(shape, dtype=self.dtype_of(tensor), device=self.device)

    def shared_zeros(self, tensor: TensorSpec, shape: tuple[int, ...]) -> torch.Tensor:
        """A zero buffer that every worker's stream may read: filled, then the filling stream synchronized."""
        zeros = self.allocate(tensor, shape, zero=True)
        self.synchronize()
        return zeros

    def tensor(self, value: Any, tensor: TensorSpec) -> torch.Tensor:
        """A feed (numpy or torch) as a contiguous tensor of the contract's dtype on the device."""
        value = self.upload(value) if isinstance(value, np.ndarray) else torch.as_tensor(value)
        return value.to(self.device, self.dtype_of(tensor)).contiguous()

    def upload(self, host: np.ndarray) -> torch.Tensor:
        """A host array on the device as is. To a GPU through pinned memory without blocking: the host
        never waits for the GPU to copy (a pageable copy would synchronize)."""
        tensor = torch.from_numpy(np.ascontiguousarray(host).reshape(host.shape))  # 0-d stays 0-d (the gates)
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def asarray(self, host: np.ndarray) -> torch.Tensor:
        tensor = self.upload(host)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        """On the host; half precision widened to float32 (numpy has no bfloat16), float64 kept."""
        array = array.detach()
        return (array.float() if array.dtype in (torch.float16, torch.bfloat16) else array).cpu().numpy()

    def concat(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(arrays))

    def worker_stream(self) -> AbstractContextManager[None]:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(worker_cuda_stream(self.device))

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def free_memory(self) -> int | None:
        return int(torch.cuda.mem_get_info(self.device)[0]) if self.device.type == "cuda" else None
