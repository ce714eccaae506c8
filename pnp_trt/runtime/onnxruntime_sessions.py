"""ONNX Runtime sessions over an exported directory's graphs, for the CPU and device backends alike: session
and provider options, the thread setting, and the checks a loaded graph must pass (identity, names, dtypes)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import validation
from ..contract import PRECISIONS, GraphSpec, ModelDims, graph_specs
from ..errors import PnPError
from ..manifest import MANIFEST, check_graph_identity, rebuild_hint

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
    value = os.environ.get(THREADS_VARIABLE, "")
    if not value.strip(validation.NUMBER_PADDING):
        return None
    try:
        count = int(validation.number_text(int, value))  # the one number rule: ASCII digits
    except ValueError:
        raise PnPError(f"{THREADS_VARIABLE} must be a whole number of threads from 1 to {MAX_THREADS}, got "
                       f"{value[:20]!r}") from None
    return validation.integer(THREADS_VARIABLE, count, 1, MAX_THREADS)


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


class CaptureRefused(PnPError):
    """ONNX Runtime would not create a graph-enabled session (a node outside the CUDA provider, copies between):
    the export is fine, its CUDA-graph capture is not."""


CAPTURE_REFUSALS = ("cannot use the graph capture feature", "cannot use the CUDA Graph feature")
"""What ONNX Runtime's session creation says when it refuses `enable_cuda_graph` (1.18 on; before)."""


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
        self._loading = threading.Lock()

    def session(self, graph: str) -> Any:
        """The graph's session, loaded on first use (once: two workers' first calls must not both load it)."""
        with self._loading:
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
            if any(refusal in str(exc) for refusal in CAPTURE_REFUSALS):
                raise CaptureRefused(f"ONNX Runtime refuses to capture {graph} as a CUDA graph "
                                     f"({str(exc).splitlines()[0][-160:]}); --no-cuda-graphs runs without") from None
            raise PnPError(f"cannot load {self.directory / graph}.onnx ({str(exc).splitlines()[0][:160]}); "
                           f"rebuild it with `pnp-trt export`") from None
        check_graph_identity(dict(session.get_modelmeta().custom_metadata_map), self.manifest,
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
        if session.get_providers()[0] != self.provider:  # ORT falls back when a GPU provider fails to start
            raise PnPError(f"onnxruntime could not start {self.provider} (it fell back to "
                           f"{session.get_providers()[0]}); {_provider_libraries(self.provider)}, or use "
                           "--provider cpu")
        return session


def _provider_libraries(provider: str) -> str:
    """What a GPU provider needs on the library path, for the message when it does not start."""
    import onnxruntime as ort

    if provider == PROVIDERS["tensorrt"]:
        return (f"onnxruntime-gpu {ort.__version__} loads the TensorRT libraries it was built against (libnvinfer "
                "of the TensorRT major version its release notes name; check `pip show tensorrt` and "
                "LD_LIBRARY_PATH), besides CUDA and cuDNN")
    return "check that the CUDA and cuDNN libraries onnxruntime-gpu was built for are on the library path"


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
