"""ONNX Runtime on a GPU provider through IO binding: feeds and outputs are torch tensors that stay on
the device (captured outputs are bound as the next pass's inputs: no host round trip per call), and the
DDIM arithmetic between calls runs on the device too.

With `cuda_graphs` the UNet replays the CUDA graphs ONNX Runtime captures (`enable_cuda_graph`). A graph
needs fixed shapes and fixed buffer addresses: one graph-enabled session serves every shape, each (batch, size)
with static buffers bound once and a graph id of its own (`gpu_graph_id`, onnxruntime ≥ 1.18). Where ONNX
Runtime refuses capture on the dynamic graph, each shape gets a session with its dimensions pinned, all of them
handed one copy of the weights (`SessionOptions.add_initializer`): a session per shape with weights of its own
was what ran the H100 out of memory. (ORT's graph optimizers bake the file's weights into the initializers they
rewrite, e.g. fused or reordered ones; those stay per session. What is shared on a GPU is measured there.)
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from ..contract import ZeroBuffers, call_sizes
from ..errors import PnPError
from .cuda_graphs import CAPTURE
from .onnxruntime_sessions import CaptureRefused, OnnxRuntimeSessions, session_options
from .torch_arrays import NUMPY_DTYPES, TORCH_DTYPES, TorchArrays


def bind(bind_method: Callable[..., None], name: str, tensor: torch.Tensor) -> None:
    """Bind a contiguous torch tensor's memory to an ORT input or output (`IOBinding.bind_input/_output`)."""
    bind_method(name, tensor.device.type, tensor.device.index or 0, NUMPY_DTYPES[tensor.dtype],
                list(tensor.shape), tensor.data_ptr())


class GraphedSession:
    """One shape's CUDA graph in a graph-enabled UNet session: static buffers bound once, its own graph id,
    calls take turns. ONNX Runtime's CUDA provider keeps its graphs per OS thread and warms up and captures
    inside a thread's first run of a graph id: that run holds the process's capture lock (`cuda_graphs.CAPTURE`)
    alone, later ones (replays) share it."""

    def __init__(self, session: Any, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                 graph_id: int):
        import onnxruntime as ort

        self.session, self.inputs, self.outputs = session, inputs, outputs
        self.binding = session.io_binding()
        for name, tensor in inputs.items():
            bind(self.binding.bind_input, name, tensor)
        for name, tensor in outputs.items():
            bind(self.binding.bind_output, name, tensor)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.captured_on: set[int] = set()
        """The threads that have captured this graph id (ORT's graphs are per thread)."""
        self._lock = threading.Lock()

    def __call__(self, feeds: Mapping[str, torch.Tensor], synchronize: Callable[[], None],
                 read: list[str]) -> dict[str, torch.Tensor]:
        """Replay with `feeds` in the static inputs; copies out only the outputs named in `read`."""
        with self._lock:
            for name, static in self.inputs.items():
                if name in feeds:
                    static.copy_(feeds[name])
                else:  # absent: not injected, gate off
                    static.zero_()
            synchronize()
            thread = threading.get_ident()
            try:
                with CAPTURE.running() if thread in self.captured_on else CAPTURE.capturing():
                    self.session.run_with_iobinding(self.binding, self.run_options)
            except Exception as exc:  # ORT's own types: capture refused (a node outside the GPU provider)
                raise PnPError(f"ONNX Runtime cannot run the UNet as a CUDA graph ({str(exc).splitlines()[0][:200]})"
                               "; run without CUDA graphs (--no-cuda-graphs)") from None
            self.captured_on.add(thread)
            copies = {name: self.outputs[name].clone() for name in read}
            synchronize()  # copied out before the next replay (perhaps from another stream) overwrites them
            return copies


TENSORRT_PROVIDER, CUDA_PROVIDER = "TensorrtExecutionProvider", "CUDAExecutionProvider"
ENGINE_CACHE = "ort-tensorrt-cache"
"""Inside the export directory: the engines ONNX Runtime's TensorRT provider builds, kept for the next start."""


def device_providers(provider: str, device_id: int, precision: str, cuda_graph: bool = False,
                     cache: Path | None = None) -> list[Any]:
    """The `providers` argument of a device session. CUDA: an fp32 export computes in fp32 (no TF32), the arena
    grows by what is asked (it never shrinks), no maximal cuDNN workspace. TensorRT: its engine and timing
    caches in `cache`, and the CUDA provider after it, so nodes TensorRT does not take stay on the GPU."""
    cuda = {"device_id": str(device_id), "use_tf32": "0" if precision == "float32" else "1",
            "arena_extend_strategy": "kSameAsRequested", "cudnn_conv_use_max_workspace": "0"}
    if provider == CUDA_PROVIDER:
        return [(provider, {**cuda, "enable_cuda_graph": "1"} if cuda_graph else cuda)]
    if provider != TENSORRT_PROVIDER:
        return [provider]
    tensorrt = {"device_id": str(device_id)}  # no trt_fp16_enable: it would run the fp32 islands in fp16 too
    if cache is not None:
        tensorrt |= {"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(cache),
                     "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(cache)}
    return [(provider, tensorrt), (CUDA_PROVIDER, cuda)]


def engine_cache(directory: Path) -> Path | None:
    """The TensorRT provider's cache folder in the export (None, with a warning, where it cannot be made)."""
    try:
        (directory / ENGINE_CACHE).mkdir(exist_ok=True)
    except OSError as exc:
        warnings.warn(f"cannot keep ONNX Runtime's TensorRT engines in {directory / ENGINE_CACHE} "
                      f"({exc.strerror}); they are rebuilt at every start", RuntimeWarning, stacklevel=3)
        return None
    return directory / ENGINE_CACHE


class OnnxRuntimeDeviceBackend(TorchArrays, OnnxRuntimeSessions):
    """`run(graph, feeds)` with torch tensors on `device` bound in place; absent inputs are zeros, gates off."""

    def __init__(self, directory: Path, manifest: dict[str, Any], provider: str = "cuda", cuda_graphs: bool = True,
                 device: torch.device | None = None):
        super().__init__(directory, manifest, provider)
        self.device = device or (torch.device("cuda", torch.cuda.current_device())  # the instance's GPU
                                 if self.provider != "CPUExecutionProvider" else torch.device("cpu"))
        self.dtype = TORCH_DTYPES[self.precision]
        self.cuda_graphs = cuda_graphs and self.provider == CUDA_PROVIDER
        self.concurrent_calls = not self.cuda_graphs
        """ONNX Runtime captures in global mode: another thread's allocation during a capture spoils it."""
        self._graphed: dict[tuple[int, int, int], GraphedSession | None] = {}
        """Per (batch, height, width) its CUDA graph, or None where ONNX Runtime refused one (run eagerly)."""
        self._graph_session: Any = None
        """The one graph-enabled UNet session of every shape; False once ONNX Runtime refused it (then
        `_pinned_session` per shape)."""
        self._weights: dict[str, Any] | None = None
        """The UNet's initializers on the device, shared by the pinned sessions (kept alive as long as they)."""
        self._opening = threading.Lock()
        self.zeros = ZeroBuffers(self.shared_zeros)

    def providers(self, cuda_graph: bool = False) -> list[Any]:
        return device_providers(self.provider, self.device.index or 0, self.precision, cuda_graph,
                                engine_cache(self.directory) if self.provider == TENSORRT_PROVIDER else None)

    def run(self, graph: str, feeds: Mapping[str, Any], outputs: Collection[str] | None = None,
            ) -> dict[str, torch.Tensor]:
        spec, read = self.specs[graph], self.specs[graph].read_outputs(outputs)
        spec.check_feeds(feeds)
        with CAPTURE.running():  # uploads allocate: never while another thread captures
            given = {t.name: self.tensor(feeds[t.name], t) for t in spec.inputs if feeds.get(t.name) is not None}
        sizes = call_sizes(self.dims, graph, tuple(given[spec.inputs[0].name].shape))
        graphed = self._graphed_session(sizes) if graph == "unet" and self.cuda_graphs else None
        if graphed is not None:
            try:
                return graphed(given, self.synchronize, read)
            except PnPError as exc:  # ORT captures at its first run: a refusal there, too, means run eagerly
                self._give_up_graph(sizes, exc, session=graphed.session)
        with CAPTURE.running():
            return self._run_eagerly(graph, given, sizes, read)

    def _run_eagerly(self, graph: str, given: Mapping[str, torch.Tensor], sizes: Mapping[str, int],
                     read: Collection[str]) -> dict[str, torch.Tensor]:
        """One uncaptured run: inputs bound (absent: zeros), fresh outputs for what is read."""
        spec = self.specs[graph]
        binding = self.session(graph).io_binding()
        for tensor in spec.inputs:
            value = given.get(tensor.name)
            bind(binding.bind_input, tensor.name, value if value is not None else
                 self.zeros.get(tensor, tensor.shape(sizes)))
        results = {t.name: self.allocate(t, t.shape(sizes)) for t in spec.outputs if t.name in read}
        for name, out in results.items():  # outputs left unbound are not copied out by ORT
            bind(binding.bind_output, name, out)
        self.synchronize()  # inputs written on torch's stream are complete before ORT's stream reads them
        self.session(graph).run_with_iobinding(binding)  # returns once ORT's stream is done
        return results

    def _graphed_session(self, sizes: Mapping[str, int]) -> GraphedSession | None:
        """The shape's graph-enabled session; None where ONNX Runtime refused to capture it (it then runs
        eagerly, after one warning: the export is fine, its graph capture is not)."""
        key = (sizes["batch"], sizes["height"], sizes["width"])
        with self._opening:
            if key not in self._graphed:
                try:
                    self._graphed[key] = self._open_graphed(sizes)
                except PnPError as exc:
                    self._give_up_graph(sizes, exc, locked=True)
            return self._graphed[key]

    def _give_up_graph(self, sizes: Mapping[str, int], exc: PnPError, locked: bool = False,
                       session: Any = None) -> None:
        """That shape runs eagerly from now on, after one warning (the export is fine, its capture is not); so does
        every other shape of `session` (a failed capture leaves the session's state unknown)."""
        key = (sizes["batch"], sizes["height"], sizes["width"])
        with contextlib.nullcontext() if locked else self._opening:
            self._graphed[key] = None
            for other, graphed in self._graphed.items():
                if graphed is not None and session is not None and graphed.session is session:
                    self._graphed[other] = None
        warnings.warn(f"ONNX Runtime could not run the UNet at batch {key[0]}, {key[1]}x{key[2]} latents as a "
                      f"CUDA graph ({str(exc).split('; rebuild')[0][:200]}); that shape runs without one "
                      "(--no-cuda-graphs turns them off)", RuntimeWarning, stacklevel=3)

    def _open_graphed(self, sizes: Mapping[str, int]) -> GraphedSession:
        """The shape's graph (id = shapes opened so far + 1) in the shared graph-enabled session, or in a pinned
        session of its own; static buffers for every input and output."""
        if self._graph_session is None:
            try:
                self._graph_session = self.open_session("unet", session_options(), self.providers(cuda_graph=True))
            except CaptureRefused:  # e.g. shape arithmetic left to the CPU with copies between
                self._graph_session = False
        session = self._graph_session or self._pinned_session(sizes)
        spec = self.specs["unet"]
        inputs = {t.name: self.allocate(t, t.shape(sizes), zero=True) for t in spec.inputs}
        outputs = {t.name: self.allocate(t, t.shape(sizes)) for t in spec.outputs}
        return GraphedSession(session, inputs, outputs, graph_id=len(self._graphed) + 1)

    def _pinned_session(self, sizes: Mapping[str, int]) -> Any:
        """A UNet session with every free dimension pinned (so ORT folds its shape arithmetic and runs every node
        on the GPU, as capture requires), on the weights all pinned sessions share."""
        options = session_options()
        for axis, size in sizes.items():
            options.add_free_dimension_override_by_name(axis, size)
        try:
            for name, (_, value) in self.shared_weights().items():
                options.add_initializer(name, value)
        except Exception as exc:  # ORT's own types
            self._weights = None  # not kept on the device for nothing
            raise PnPError(f"ONNX Runtime would not share the UNet's weights between sessions "
                           f"({str(exc).splitlines()[0][-160:]})") from None
        return self.open_session("unet", options, self.providers(cuda_graph=True))

    def shared_weights(self) -> dict[str, tuple[torch.Tensor, Any]]:
        """The UNet's initializers, read from its graph once, as device tensors and the OrtValues that view them
        (`add_initializer` takes only memory its caller owns: DLPack views of torch's tensors, kept alive here)."""
        if self._weights is None:
            import onnx
            import onnxruntime as ort
            from onnx import numpy_helper

            graph = onnx.load(str(self.directory / "unet.onnx")).graph  # its external data beside it
            weights = {}
            for weight in graph.initializer:
                tensor = torch.from_numpy(numpy_helper.to_array(weight).copy()).to(self.device)
                weights[weight.name] = (tensor, ort.OrtValue.from_dlpack(tensor.__dlpack__()))
            self._weights = weights
        return self._weights
