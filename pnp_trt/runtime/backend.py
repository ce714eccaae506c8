"""What the sampler needs from a backend: run a graph, move arrays, and a few array operations."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..contract import ModelDims
from ..schedule import Array, Schedule
from ..tokenizer import PromptTokenizer


class Backend(Protocol):
    """One runner per backend behind one small interface (cf. Polygraphy's runners)."""

    name: str
    concurrent_calls: bool
    """Whether calls from several threads may run at once (else a `Translator` makes them take turns)."""
    max_prompt_batch: int | None
    """The most target prompts one injection batch may hold (2 UNet samples each); None: no limit."""

    def run(self, graph: str, feeds: Mapping[str, Array], outputs: Collection[str] | None = None) -> dict[str, Array]:
        """Run one of the graphs of `contract.graph_specs`; feeds and outputs keyed by tensor name.

        `outputs`: the ones the caller reads (None: all). The rest are never copied out or kept. Feeds the
        graph lacks are an error (`GraphSpec.check_feeds`); absent injected inputs are zeros, gates off.

        The arrays returned belong to the caller: no later `run` writes into them (the sampler keeps captured
        features, text embeddings and latents across many calls), so a backend that reuses buffers (CUDA-graph
        replays, TensorRT's bindings) hands out copies or fresh allocations of what is read."""

    def worker_stream(self) -> AbstractContextManager[None]:
        """Run the calling thread's work inside this block on a stream of its own (GPU backends: not the
        legacy default stream, which synchronizes with everything); a no-op on the CPU."""

    def asarray(self, host: np.ndarray) -> Array:
        """A host array as the backend's array (floats in the backend's precision)."""

    def to_numpy(self, array: Array) -> np.ndarray:
        """A backend array back on the host, as float32/int64."""

    def concat(self, arrays: Sequence[Array]) -> Array:
        """Concatenate along the batch axis."""

    def synchronize(self) -> None:
        """Block until queued work is done (a no-op for synchronous backends)."""

    def free_memory(self) -> int | None:
        """Free bytes on the device the backend computes on; None on the CPU."""


@dataclass
class LoadedModel:
    """Everything the sampler needs, from a diffusers directory or an exported one."""

    backend: Backend
    tokenizers: Mapping[str, PromptTokenizer]
    """The tokenizer of each text encoder graph input (SD: `input_ids`; SDXL: also `input_ids_2`)."""
    schedule: Schedule
    dims: ModelDims
    identity: str
    """What the model is (id or directory + weights/manifest hash): recorded in outputs, keys caches."""
