"""ONNX Runtime backend over an exported directory. Lean: numpy, onnxruntime and tokenizers only —
no torch, diffusers or transformers (a test enforces it)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import validation
from ..contract import PRECISIONS, GraphSpec, ModelDims, ZeroBuffers, call_sizes, graph_specs
from ..errors import PnPError
from ..manifest import EXPORT_ID_KEY, MANIFEST, check_graph_identity, rebuild_hint
from .backend import LoadedModel
from .exported import open_exported

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def session_options() -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    threads = intra_op_threads()
    if threads:
        options.intra_op_num_threads = threads
    return options


THREADS_VARIABLE = "PNP_TRT_THREADS"
"""ONNX Runtime threads per graph (`--threads` sets it); unset: one per core."""
MAX_THREADS = 4 * (os.cpu_count() or 1)
"""More threads than this only cost memory (100000 once started thousands: 16 GiB)."""


def intra_op_threads() -> int | None:
    """`THREADS_VARIABLE` as a count from 1 to `MAX_THREADS`, or None."""
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise PnPError(f"{THREADS_VARIABLE} must be a whole number of threads from 1 to {MAX_THREADS}, got "
                       f"{value[:20]!r}")
    return validation.integer(THREADS_VARIABLE, int(value), 1, MAX_THREADS)


def check_provider(provider: str) -> str:
    """The ORT provider name for `provider`; a clear error when this onnxruntime lacks it."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise PnPError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise PnPError(f"onnxruntime here has no {name} (it has {', '.join(ort.get_available_providers())}); "
                       "install onnxruntime-gpu on a CUDA machine (`pip install onnxruntime-gpu`) or use "
                       "--provider cpu")
    return name


class OnnxRuntimeSessions:
    """An exported directory's graphs as lazily created ORT sessions (one per graph) on one provider."""

    name = "onnxruntime"
    concurrent_calls: bool = True
    max_prompt_batch: int | None = None

    def __init__(self, directory: Path, manifest: dict[str, Any], provider: str = "cpu"):
        self.directory, self.provider, self.manifest = directory, check_provider(provider), manifest
        self.dims = ModelDims.from_dict(manifest["dims"])
        self.specs = graph_specs(self.dims)
        self.precision = PRECISIONS[manifest["precision"]]
        self._sessions: dict[str, Any] = {}

    def session(self, graph: str) -> Any:
        if graph not in self._sessions:
            self._sessions[graph] = self.open_session(graph, session_options(), self.providers())
        return self._sessions[graph]

    def providers(self) -> list[Any]:
        """The `providers` argument of an ORT session (names, or (name, options) pairs)."""
        return [self.provider]

    def open_session(self, graph: str, options: Any, providers: list[Any]) -> Any:
        """One ORT session over `graph.onnx`; a corrupt or unreadable file is a one-line error."""
        import onnxruntime as ort
        try:
            session = ort.InferenceSession(str(self.directory / f"{graph}.onnx"), options, providers=providers)
        except Exception as exc:  # ORT raises its own types for unreadable/corrupt graphs
            raise PnPError(f"cannot load {self.directory / graph}.onnx ({str(exc).splitlines()[0][:160]}); "
                           f"rebuild it with `pnp-trt export`") from None
        check_graph_identity(session.get_modelmeta().custom_metadata_map.get(EXPORT_ID_KEY), self.manifest,
                             self.directory / f"{graph}.onnx")
        spec = self.specs[graph]
        names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        if names != (list(spec.input_names), list(spec.output_names)):  # e.g. another graph under this name
            raise PnPError(f"{self.directory / graph}.onnx is not a PnP {graph} graph (inputs "
                           f"{', '.join(names[0][:3])}{', …' if len(names[0]) > 3 else ''}); "
                           f"rebuild it with `pnp-trt export`")
        declared = declaration_problem(session.get_inputs(), spec, self.manifest["precision"])
        if declared:
            raise PnPError(f"{self.directory / graph}.onnx disagrees with {MANIFEST} ({declared}); rebuild with "
                           f"`{rebuild_hint(self.manifest, Path('NEW_DIR'))}`")
        if session.get_providers()[0] != self.provider:  # ORT falls back to the CPU when a GPU provider fails
            raise PnPError(f"onnxruntime could not start {self.provider} (it fell back to "
                           f"{session.get_providers()[0]}); check that CUDA and cuDNN libraries are on the "
                           "library path, or use --provider cpu")
        return session


ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
             "bool": "tensor(bool)"}


def declaration_problem(inputs: Sequence[Any], spec: GraphSpec, precision: str) -> str | None:
    """What a loaded graph's inputs declare that the manifest's contract does not (a dtype, i.e. the precision,
    or a fixed size such as the text width), or None."""
    for declared, tensor in zip(inputs, spec.inputs, strict=True):
        expected = ORT_TYPES.get(tensor.numpy_dtype(PRECISIONS[precision]))
        if declared.type != expected:
            return f"input {tensor.name} is {declared.type}, the manifest's {precision} export means {expected}"
        for axis, (size, wanted) in enumerate(zip(declared.shape, tensor.axes, strict=False)):
            if isinstance(wanted, int) and isinstance(size, int) and size != wanted:
                return f"input {tensor.name} axis {axis} is {size}, the manifest's dims say {wanted}"
    return None


class OnnxRuntimeBackend(OnnxRuntimeSessions):
    """`run(graph, feeds)` over numpy arrays; absent injected inputs are zeros, gates off."""

    def __init__(self, directory: Path, manifest: dict[str, Any], provider: str = "cpu"):
        super().__init__(directory, manifest, provider)
        self.zeros = ZeroBuffers(lambda tensor, shape: np.zeros(shape, tensor.numpy_dtype(self.precision)))

    def _feeds(self, graph: str, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        spec, full = self.specs[graph], {}
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
    return LoadedModel(backend, exported.tokenizer, exported.schedule, exported.dims, exported.identity("onnx"))
