"""Random inputs of a graph at given axis sizes: what the exporter traces with and validates on, and what the
tests feed a single graph."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..contract import GraphSpec


def random_feeds(spec: GraphSpec, sizes: Mapping[str, int], precision: str, seed: int = 0,
                 vocab_size: int = 49408) -> dict[str, Any]:
    """Random numpy inputs for a graph at the given axis sizes (gates on, timestep mid-schedule, SDXL's size
    conditioning a real 1024² one: its sinusoidal embedding is only exercised at real magnitudes)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for tensor in spec.inputs:
        shape, dtype = tensor.shape(sizes), tensor.numpy_dtype(precision)
        if tensor.name == "timestep":
            feeds[tensor.name] = np.full(shape, 500.0, dtype=dtype)
        elif tensor.name == "time_ids":
            feeds[tensor.name] = np.tile(np.array([1024, 1536, 0, 0, 1024, 1536], dtype=dtype), (shape[0], 1))
        elif dtype == "bool":
            feeds[tensor.name] = np.array(True)
        elif dtype == "int64":
            feeds[tensor.name] = rng.integers(0, vocab_size, shape, dtype=np.int64)
        elif tensor.name == "image":
            feeds[tensor.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        else:
            feeds[tensor.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return feeds
