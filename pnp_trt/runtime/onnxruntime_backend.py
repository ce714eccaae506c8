"""ONNX Runtime on the CPU provider: numpy in, numpy out; and `open_onnxruntime`, which picks the CPU backend
or the device one (`onnxruntime_device.py`) for the provider asked for. Lean: numpy, onnxruntime and tokenizers
only — no torch, diffusers or transformers (a test enforces it)."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import ZeroBuffers, call_sizes
from .backend import LoadedModel
from .exported import open_exported
from .onnxruntime_sessions import OnnxRuntimeSessions


class OnnxRuntimeBackend(OnnxRuntimeSessions):
    """`run(graph, feeds)` over numpy arrays; absent injected inputs are zeros, gates off."""

    def __init__(self, directory: Path, manifest: dict[str, Any], provider: str = "cpu"):
        super().__init__(directory, manifest, provider)
        self.zeros = ZeroBuffers(lambda tensor, shape: np.zeros(shape, tensor.numpy_dtype(self.precision)))

    def _feeds(self, graph: str, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        spec, full = self.specs[graph], {}
        spec.check_feeds(feeds)
        sizes = call_sizes(self.dims, graph, tuple(feeds[spec.inputs[0].name].shape))
        for tensor in spec.inputs:
            value = feeds.get(tensor.name)
            if value is None:
                value = self.zeros.get(tensor, tensor.shape(sizes))
            full[tensor.name] = np.asarray(value, dtype=tensor.numpy_dtype(self.precision))
        return full

    def run(self, graph: str, feeds: Mapping[str, Any], outputs: Collection[str] | None = None,
            ) -> dict[str, np.ndarray]:
        names = self.specs[graph].read_outputs(outputs)
        arrays = self.session(graph).run(names, self._feeds(graph, feeds))
        return dict(zip(names, arrays, strict=True))

    def worker_stream(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def asarray(self, host: np.ndarray) -> np.ndarray:
        return host.astype(self.precision) if np.issubdtype(host.dtype, np.floating) else host

    def to_numpy(self, array: np.ndarray) -> np.ndarray:
        return array.astype(np.float32) if array.dtype == np.float16 else array

    def concat(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(list(arrays))

    def synchronize(self) -> None:
        """ORT's `run` returns host arrays: nothing is left queued."""

    def free_memory(self) -> int | None:
        return None


def open_onnxruntime(directory: Path, provider: str = "cpu", cuda_graphs: bool = True) -> LoadedModel:
    """An exported directory (`pnp-trt export`) on ONNX Runtime: numpy on the CPU provider; on a GPU
    provider torch tensors kept on the device through IO binding (with CUDA graphs unless switched off)."""
    exported = open_exported(directory)
    backend: OnnxRuntimeSessions
    if provider == "cpu":
        backend = OnnxRuntimeBackend(exported.directory, exported.manifest, provider)
    else:
        from .onnxruntime_device import OnnxRuntimeDeviceBackend
        backend = OnnxRuntimeDeviceBackend(exported.directory, exported.manifest, provider, cuda_graphs=cuda_graphs)
    return LoadedModel(backend, exported.tokenizers, exported.schedule, exported.dims, exported.identity("onnx"))
