"""PyTorch backend: runs the `torch_graphs` modules of a loaded diffusers model, the UNet through CUDA
graphs on CUDA (`cuda_graphs.py`; eager elsewhere or when switched off)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..contract import FLOAT, graph_specs
from ..models import TorchModel, load_model
from ..schedule import Schedule
from ..torch_graphs import PnPUNetGraph, TextEncoderGraph, VaeDecoderGraph, VaeEncoderGraph
from .backend import LoadedModel
from .cuda_graphs import CudaGraphs

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "bool": torch.bool}


class TorchBackend:
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
            "text_encoder": TextEncoderGraph(model.text_encoder),
            "vae_encoder": VaeEncoderGraph(model.vae),
            "vae_decoder": VaeDecoderGraph(model.vae),
            "unet": PnPUNetGraph(model.unet),
        }
        self.unet_graphs = CudaGraphs(self._run_unet, self.device) if cuda_graphs and self.device.type == "cuda" \
            else None

    def _run_unet(self, inputs: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        spec = self.specs["unet"]
        return dict(zip(spec.output_names, self.graphs["unet"](*inputs.values()), strict=True))

    def _tensor(self, value: Any, dtype: str) -> torch.Tensor:
        target = self.dtype if dtype == FLOAT else _TORCH_DTYPES[dtype]
        return torch.as_tensor(value).to(self.device, target)

    @torch.inference_mode()
    def run(self, graph: str, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        spec = self.specs[graph]
        args = {t.name: None if t.name not in feeds else self._tensor(feeds[t.name], t.dtype) for t in spec.inputs}
        if graph == "unet":
            return self.unet_graphs(args) if self.unet_graphs is not None else self._run_unet(args)
        return dict(zip(spec.output_names, self.graphs[graph](*args.values()), strict=True))

    def asarray(self, host: np.ndarray) -> torch.Tensor:
        dtype = FLOAT if np.issubdtype(host.dtype, np.floating) else str(host.dtype)
        return self._tensor(host, dtype)

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        array = array.detach().cpu()
        return (array.float() if array.dtype in (torch.float16, torch.bfloat16) else array).numpy()

    def concat(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(arrays))

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free_memory(self) -> int | None:
        return int(torch.cuda.mem_get_info(self.device)[0]) if self.device.type == "cuda" else None


def load_torch(model: str, device: torch.device | None = None, dtype: torch.dtype | None = None,
               cuda_graphs: bool = True) -> LoadedModel:
    """A diffusers model (hub id or directory) on the torch backend."""
    return on_torch(load_model(model, device, dtype), cuda_graphs)


def on_torch(model: TorchModel, cuda_graphs: bool = True) -> LoadedModel:
    """An already loaded model on the torch backend (UNet CUDA graphs on CUDA unless switched off)."""
    return LoadedModel(TorchBackend(model, cuda_graphs), model.tokenizer,
                       Schedule.from_config(model.scheduler_config), model.dims, identity=model.model_id)
