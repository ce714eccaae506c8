"""TensorRT backend: deserialized engines behind the same `run(graph, feeds)` as every backend.

Per worker (one `TensorRTBackend`): one execution context per engine profile, all sharing one user-managed
activation region sized to the largest engine (calls take turns); torch CUDA tensors as I/O buffers;
captured outputs bound directly as the next pass's inputs (no copies). The UNet, called ~100 times an edit
at a few shapes, replays a CUDA graph captured around `execute_async_v3` per shape and injection state
(`cuda_graphs.py`, on the graphs' own stream, each graph on a context of its own) unless switched off.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import tensorrt as trt
import torch

from ..contract import PRECISIONS, ModelDims, ZeroBuffers, call_sizes, graph_specs
from ..engines.buffers import shared_activation_bytes
from ..engines.compat import ENGINES_MANIFEST, EngineEntry, build_command, check_entry, read_entries
from ..engines.profiles import check_request, profile_index, profile_shapes
from ..errors import PnPError
from ..manifest import GRAPHS, require_tensorrt_attention
from .backend import LoadedModel
from .cuda_graphs import CAPTURE, CudaGraphs, signature
from .exported import open_exported
from .torch_arrays import TORCH_DTYPES, TorchArrays

_TRT_DTYPES = {"float32": trt.DataType.FLOAT, "float16": trt.DataType.HALF, "int64": trt.DataType.INT64,
               "bool": trt.DataType.BOOL}


class TensorRTBackend(TorchArrays):
    name = "tensorrt"
    concurrent_calls: bool = False
    """One execution context per engine and one activation region: calls take turns."""

    def __init__(self, directory: Path, manifest: dict[str, Any], entries: dict[str, EngineEntry],
                 cuda_graphs: bool = True):
        from ..engines.build import LOGGER, current_platform

        self.directory, self.entries = directory, entries
        self.max_prompt_batch: int | None = entries["unet"].shapes.max_batch
        self.dims = ModelDims.from_dict(manifest["dims"])
        self.specs = graph_specs(self.dims)
        self.dtype = TORCH_DTYPES[PRECISIONS[manifest["precision"]]]
        self.device = torch.device("cuda", torch.cuda.current_device())  # the instance's GPU (Triton's set_device)
        runtime = trt.Runtime(LOGGER)
        here = current_platform()
        self.engines: dict[str, trt.ICudaEngine] = {}
        for graph in GRAPHS:
            entry = entries[graph]
            check_entry(entry, here, manifest["files"][f"{graph}.onnx"]["sha256"], manifest["export_id"], directory)
            engine = runtime.deserialize_cuda_engine((directory / entry.file).read_bytes())
            if engine is None:
                rebuild = build_command(directory, entry.shapes)
                raise PnPError(f"TensorRT cannot load {entry.file}; rebuild: `{rebuild}`")
            self._check_engine(graph, engine, entry)
            self.engines[graph] = engine
        size = shared_activation_bytes({g: e.device_memory_size_v2 for g, e in self.engines.items()})
        self.activations = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        self.contexts = {graph: [self._context(graph, engine, profile) for profile in range(
            engine.num_optimization_profiles)] for graph, engine in self.engines.items()}
        """Per graph, one execution context per optimization profile (`profile_index` picks one per call)."""
        self.zeros = ZeroBuffers(self.shared_zeros)
        """Stand-ins for absent inputs; also scratch for outputs no caller reads, one per shape (their names never
        collide with an input's). Outputs that are read get fresh memory: they are the caller's."""
        self.unet_graphs = CudaGraphs(self._execute_graphed, self.device) if cuda_graphs else None
        self._graph_contexts: dict[tuple, trt.IExecutionContext] = {}
        self._graph_outputs: dict[tuple, dict[str, torch.Tensor]] = {}

    def _context(self, graph: str, engine: trt.ICudaEngine, profile: int) -> trt.IExecutionContext:
        """An execution context on the shared activation region, set to one optimization profile."""
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self.activations.data_ptr(), self.activations.numel())
        try:  # the Python bindings raise RuntimeError where the C++ API returns false
            refused = "" if context.set_optimization_profile_async(profile, torch.cuda.current_stream().cuda_stream) \
                else "it returned false"
        except RuntimeError as exc:
            refused = str(exc).splitlines()[0][:120]
        if refused:
            raise PnPError(f"TensorRT refused optimization profile {profile} of the {graph} engine ({refused}); "
                           f"rebuild: `{build_command(self.directory, self.entries[graph].shapes)}`")
        torch.cuda.current_stream().synchronize()  # set before any other stream enqueues on it
        return context

    def _execute_graphed(self, inputs: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """The UNet for `CudaGraphs`: a context of its own per captured graph (a graph keeps the state its
        context had at capture) and its outputs allocated once, both at the first, uncaptured warm-up run; the
        other warm-up and the captured run write the same buffers (no allocation inside the capture). A signature
        whose capture failed runs eagerly into fresh memory, as every `run`'s outputs are the caller's."""
        key, sample = signature(inputs), inputs["sample"]
        if key not in self._graph_contexts and sample is not None:
            profile = profile_index("unet", int(sample.shape[0]))
            self._graph_contexts[key] = self._context("unet", self.engines["unet"], profile)
        if self.unet_graphs is not None and self.unet_graphs.settled(key):  # run eagerly: fresh outputs
            return self._execute("unet", inputs, context=self._graph_contexts.get(key))
        outputs = self._execute("unet", inputs, context=self._graph_contexts.get(key),
                                into=self._graph_outputs.get(key))
        self._graph_outputs.setdefault(key, outputs)  # as trtexec: the capture writes the warm-ups' buffers
        return outputs

    def _check_engine(self, graph: str, engine: trt.ICudaEngine, entry: EngineEntry) -> None:
        """The plan itself must match the contract's dtypes and engines.json's limits (a plan rebuilt with other
        limits beside an old record, say), profile by profile."""
        rebuild = build_command(self.directory, entry.shapes)
        profiles = profile_shapes(self.specs[graph], self.dims, entry.shapes)
        if engine.num_optimization_profiles != len(profiles):
            raise PnPError(f"{entry.file} has {engine.num_optimization_profiles} optimization profile(s), this "
                           f"version of pnp-trt builds {len(profiles)}; rebuild: `{rebuild}`")
        for tensor in self.specs[graph].inputs + self.specs[graph].outputs:
            if engine.get_tensor_dtype(tensor.name) != _TRT_DTYPES[str(self.dtype_of(tensor)).removeprefix("torch.")]:
                raise PnPError(f"{entry.file}: {tensor.name} is {engine.get_tensor_dtype(tensor.name)}, the contract "
                               f"says {self.dtype_of(tensor)}; rebuild: `{rebuild}`")
            for index, profile in enumerate(profiles):
                if tensor.name not in profile:
                    continue
                built = tuple(_dims(dims) for dims in engine.get_tensor_profile_shape(tensor.name, index))
                if built != profile[tensor.name]:
                    raise PnPError(f"{entry.file} was built for {tensor.name} shapes {built} (profile {index}), "
                                   f"{ENGINES_MANIFEST} says {profile[tensor.name]}; rebuild: `{rebuild}`")

    def _check_profile(self, graph: str, feeds: Mapping[str, Any]) -> None:
        """The call's batch and size must lie inside the engine's optimization profile."""
        sizes = call_sizes(self.dims, graph, tuple(feeds[self.specs[graph].inputs[0].name].shape))
        size = None if graph == "text_encoder" else (sizes["height"], sizes["width"])
        shapes = self.entries[graph].shapes
        check_request(graph, shapes, sizes["batch"], size, build_command(self.directory, shapes))

    def run(self, graph: str, feeds: Mapping[str, Any], outputs: Collection[str] | None = None,
            ) -> dict[str, torch.Tensor]:
        self.specs[graph].check_feeds(feeds)
        self._check_profile(graph, feeds)
        read = self.specs[graph].read_outputs(outputs)
        with CAPTURE.running():  # uploads allocate: never while another thread captures
            inputs = {t.name: None if feeds.get(t.name) is None else self.tensor(feeds[t.name], t)
                      for t in self.specs[graph].inputs}
        if graph == "unet" and self.unet_graphs is not None:
            return self.unet_graphs(inputs, read)
        with CAPTURE.running():
            return self._execute(graph, inputs, read)

    def _execute(self, graph: str, inputs: Mapping[str, torch.Tensor | None], read: Collection[str] | None = None,
                 context: trt.IExecutionContext | None = None,
                 into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Bind every input (absent: a zero buffer or a false gate) and output, and enqueue the engine on the
        current stream (inside a CUDA graph capture: the capture stream). Returns the outputs named in
        `read` (None: all), each in fresh memory (or `into`'s buffers, where given); the others are written to
        reused scratch buffers."""
        spec = self.specs[graph]
        first = inputs[spec.inputs[0].name]
        if first is None:
            raise PnPError(f"the {graph} engine needs its {spec.inputs[0].name} input")
        sizes = call_sizes(self.dims, graph, tuple(first.shape))
        context = context or self.contexts[graph][profile_index(graph, sizes["batch"])]
        for tensor in spec.inputs:  # torch's allocator reuses freed memory in stream order: no keep-alive needed
            value = inputs[tensor.name]
            if value is None:  # not injected: a zero buffer (or a false gate), allocated once per shape
                value = self.zeros.get(tensor, tensor.shape(sizes))
            if tuple(value.shape) != _dims(context.get_tensor_shape(tensor.name)) \
                    and not context.set_input_shape(tensor.name, tuple(value.shape)):  # unchanged: not set again
                raise PnPError(f"the {graph} engine refuses {tensor.name} of shape {tuple(value.shape)}; rebuild: "
                               f"`{build_command(self.directory, self.entries[graph].shapes)}`")
            _bind(context, tensor.name, value)
        unresolved = context.infer_shapes()
        if unresolved:
            raise PnPError(f"the {graph} engine cannot resolve the shapes of {', '.join(unresolved)}")
        outputs = {}
        for tensor in spec.outputs:
            shape = _dims(context.get_tensor_shape(tensor.name))
            kept = read is None or tensor.name in read
            # what is read is the caller's (the Backend contract): fresh memory; what is not, one scratch buffer
            out = (into[tensor.name] if into is not None else self.allocate(tensor, shape)) if kept \
                else self.zeros.get(tensor, shape)
            _bind(context, tensor.name, out)
            if kept:
                outputs[tensor.name] = out
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise EnqueueFailed(f"TensorRT failed to run the {graph} engine")
        return outputs


class EnqueueFailed(RuntimeError):
    """`execute_async_v3` returned False (inside a CUDA-graph capture: the capture is abandoned)."""


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _bind(context: trt.IExecutionContext, name: str, tensor: torch.Tensor) -> None:
    if not context.set_tensor_address(name, tensor.data_ptr()):
        raise PnPError(f"TensorRT refused the address of {name} (shape {tuple(tensor.shape)}, {tensor.dtype})")


def open_tensorrt(directory: Path, cuda_graphs: bool = True) -> LoadedModel:
    """An exported directory with engines built by `pnp-trt build`, on TensorRT (UNet CUDA graphs unless
    switched off)."""
    exported = open_exported(directory)
    require_tensorrt_attention(exported.manifest, exported.directory, trt.__version__)
    backend = TensorRTBackend(exported.directory, exported.manifest, read_entries(exported.directory), cuda_graphs)
    return LoadedModel(backend, exported.tokenizers, exported.schedule, exported.dims, exported.identity("tensorrt"))
