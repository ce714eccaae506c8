"""Buffer planning (pure Python): bytes of every tensor a graph binds at a given batch and size, and of the
features a capture keeps, from the one I/O contract."""

from __future__ import annotations

import math

from ..contract import GraphSpec, InjectionPoint, ModelDims, axis_sizes, captured_name, graph_specs

_BYTES = {"float32": 4, "float16": 2, "int64": 8, "bool": 1}


def tensor_bytes(spec: GraphSpec, dims: ModelDims, batch: int, height: int, width: int,
                 precision: str) -> dict[str, int]:
    """Bytes of each input and output of `spec` at this batch and image size."""
    sizes = axis_sizes(dims, batch, height, width)
    return {t.name: math.prod(t.shape(sizes)) * _BYTES[t.numpy_dtype(precision)] for t in spec.inputs + spec.outputs}


def feature_bytes(dims: ModelDims, height: int, width: int, precision: str,
                  points: tuple[InjectionPoint, ...] | None = None) -> int:
    """Bytes of one step's captured tensors (batch 1) for the given injection points (None: all the model's)."""
    sizes = tensor_bytes(graph_specs(dims)["unet"], dims, 1, height, width, precision)
    return sum(sizes[captured_name(p)] for p in (dims.points if points is None else points))


def shared_activation_bytes(per_engine: dict[str, int]) -> int:
    """Engines of one worker run one at a time, so one region the size of the largest serves them all."""
    return max(per_engine.values(), default=0)


ACTIVATION_PER_FEATURE_BYTE = 4
"""Working memory of one UNet sample per byte of one step's captured features: measured 3.4 with
bench/gpu_memory.py (eager torch fp16, SD 2.1 at 512² on an H100: 88 MiB per sample against 25.6 MiB of
features), rounded up. Only sizes the default prompt batch."""


def auto_prompt_batch(free_bytes: int | None, dims: ModelDims, height: int, width: int, precision: str,
                      cpu_default: int = 4, most: int = 8) -> int:
    """Prompts per injection batch: what half the free device memory holds (2 samples per prompt), 1..most;
    `cpu_default` where the backend reports no device memory."""
    if free_bytes is None:
        return cpu_default
    per_prompt = 2 * ACTIVATION_PER_FEATURE_BYTE * feature_bytes(dims, height, width, precision)
    return max(1, min(most, free_bytes // 2 // per_prompt))
