"""PyTorch backend: runs the `torch_graphs` modules of a loaded diffusers model, the UNet through CUDA
graphs on CUDA (`cuda_graphs.py`; eager elsewhere or when switched off)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

from ..contract import graph_specs
from ..models import TorchModel, load_diffusers, model_identity
from ..schedule import Schedule
from ..torch_graphs import PnPUNetGraph, TextEncoderGraph, VaeDecoderGraph, VaeEncoderGraph
from .backend import LoadedModel
from .cuda_graphs import CAPTURE, CudaGraphs
from .onnxruntime_sessions import intra_op_threads
from .torch_arrays import TorchArrays


class TorchBackend(TorchArrays):
    """`run(graph, feeds)` over torch modules; inputs absent from feeds are `None` (no injection).

    With `cuda_graphs` (on CUDA) the UNet, called ~100 times an edit at a few fixed shapes, replays a
    graph captured per shape and injection state; the text encoder and VAE, called once or twice, run eagerly.
    """

    name = "torch"
    concurrent_calls: bool = True
    max_prompt_batch: int | None = None

    def __init__(self, model: TorchModel, cuda_graphs: bool = True):
        self.device, self.dtype = model.device, model.dtype
        self.specs = graph_specs(model.dims)
        self.graphs: dict[str, torch.nn.Module] = {
            "text_encoder": TextEncoderGraph(model.text_encoders, model.dims),
            "vae_encoder": VaeEncoderGraph(model.vae),
            "vae_decoder": VaeDecoderGraph(model.vae),
            "unet": PnPUNetGraph(model.unet, model.dims),
        }
        self.unet_graphs = CudaGraphs(self._run_unet, self.device) if cuda_graphs and self.device.type == "cuda" \
            else None

    def _run_unet(self, inputs: Mapping[str, torch.Tensor | None],
                  read: Collection[str] | None = None) -> dict[str, torch.Tensor]:
        """The UNet's outputs named in `read` (None: all); the hooks keep no other captured tensor."""
        spec = self.specs["unet"]
        outputs = self.graphs["unet"](*inputs.values(), keep=None if read is None else frozenset(read))
        return {name: out for name, out in zip(spec.output_names, outputs, strict=True)
                if read is None or name in read}

    @torch.inference_mode()
    def run(self, graph: str, feeds: Mapping[str, Any], outputs: Collection[str] | None = None,
            ) -> dict[str, torch.Tensor]:
        spec, read = self.specs[graph], self.specs[graph].read_outputs(outputs)
        spec.check_feeds(feeds)
        with CAPTURE.running():  # uploads allocate: never while another thread captures
            args = {t.name: None if t.name not in feeds else self.tensor(feeds[t.name], t) for t in spec.inputs}
        if graph == "unet" and self.unet_graphs is not None:
            return self.unet_graphs(args, read)
        with CAPTURE.running():
            if graph == "unet":
                return self._run_unet(args, read)
            return dict(zip(spec.output_names, self.graphs[graph](*args.values()), strict=True))


def open_torch(model: str | TorchModel, device: torch.device | None = None, dtype: torch.dtype | None = None,
               cuda_graphs: bool = True, injection_preset: str | None = None) -> LoadedModel:
    """A diffusers model (hub id or directory, loaded here on `device`/`dtype`; or already loaded) on the torch
    backend, the UNet replayed as CUDA graphs on CUDA unless switched off."""
    threads = intra_op_threads()  # --threads / PNP_TRT_THREADS: the same count as ONNX Runtime's sessions
    if threads is not None:
        torch.set_num_threads(threads)
    if isinstance(model, str):
        model = load_diffusers(model, device, dtype, injection_preset)
    return LoadedModel(TorchBackend(model, cuda_graphs), model.tokenizers,
                       Schedule.from_config(model.scheduler_config), model.dims,
                       identity=model_identity(model.model_id))
