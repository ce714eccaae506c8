"""CUDA graphs over a callable of torch tensors: capture once per input signature, replay after.

A UNet call at fixed shapes launches the same ~1,000 kernels every time; on a datacenter GPU launching
them costs more than running them. A captured graph replays them with one launch. The torch and TensorRT
backends share this one mechanism: static input buffers per signature (names, shapes, dtypes, which
optional inputs are present), warm-up, capture on the owner's stream, replay, the outputs read copied out.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

import torch

Tensors = Mapping[str, torch.Tensor | None]
GraphFunction = Callable[[Tensors], Mapping[str, torch.Tensor]]
"""Inputs by name (None: an optional input left out) → outputs by name; no host syncs inside."""

class CaptureLock:
    """Process-wide: while a CUDA graph is captured no other thread launches CUDA work ("no non-captured CUDA work
    may run in this process while capture is underway", PyTorch's CUDA notes; ONNX Runtime captures in global
    mode). Runs share the lock with each other (a thread may nest them); a capture waits for the runs under way
    and holds off new ones. It covers what the backends launch in `run`, not the sampler's own arithmetic."""

    def __init__(self) -> None:
        self._state = threading.Condition()
        self._running = 0
        self._capturing = False
        self._depth = threading.local()
        """Per thread: how many `running` blocks it is inside (a nested one never waits)."""

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around uncaptured device work: waits while a capture is under way."""
        depth = getattr(self._depth, "value", 0)
        with self._state:
            if depth == 0:
                self._state.wait_for(lambda: not self._capturing)
            self._running += 1
        self._depth.value = depth + 1
        try:
            yield
        finally:
            self._depth.value = depth
            with self._state:
                self._running -= 1
                self._state.notify_all()

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Around a capture: alone on the device. Never from inside `running` (it would wait for itself)."""
        if getattr(self._depth, "value", 0):
            raise RuntimeError("a CUDA graph capture was started inside a run holding the capture lock")
        with self._state:
            self._state.wait_for(lambda: not self._capturing)
            self._capturing = True
            try:
                self._state.wait_for(lambda: self._running == 0)
            except BaseException:  # interrupted while waiting: the others must not wait for it for ever
                self._capturing = False
                self._state.notify_all()
                raise
        try:
            yield
        finally:
            with self._state:
                self._capturing = False
                self._state.notify_all()


CAPTURE = CaptureLock()
"""The one capture lock of this process: every backend's device work takes it."""

WARMUP_RUNS = 2
"""Eager runs on the capture stream before capturing (lazy library initialisation, autotuning)."""


def signature(inputs: Tensors) -> tuple[tuple[str, tuple[int, ...] | None, torch.dtype | None], ...]:
    """What one captured graph is specific to: every input's shape and dtype, and which are absent."""
    return tuple((name, None if t is None else tuple(t.shape), None if t is None else t.dtype)
                 for name, t in inputs.items())


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor | None]
    outputs: dict[str, torch.Tensor]


class CudaGraphs:
    """Captured graphs of one function, keyed by `signature`; calls take turns on one stream.

    Replay writes the same static buffers every time, so a lock serialises calls (they would queue
    on the one GPU anyway) and every output is copied before the lock is released.
    """

    def __init__(self, function: GraphFunction, device: torch.device):
        self.function, self.device = function, device
        self.stream = torch.cuda.Stream(device)
        self._graphs: dict[tuple, _Captured | None] = {}
        """Per signature its graph, or None where its capture failed (that signature runs eagerly)."""
        self.broken = False
        """A capture CUDA itself invalidated leaves torch's allocator unable to capture again: all eager."""
        self._lock = threading.Lock()

    def settled(self, key: tuple) -> bool:
        """Whether the signature `key` was captured, or failed to be (its calls are no longer warm-ups)."""
        return self.broken or key in self._graphs

    def __len__(self) -> int:
        """Graphs captured (signatures that failed to capture and run eagerly are not counted)."""
        return sum(entry is not None for entry in self._graphs.values())

    def __call__(self, inputs: Tensors, read: Collection[str] | None = None) -> dict[str, torch.Tensor]:
        """Replay the graph of this signature (capturing it first if new); copies out the outputs named in
        `read` (None: all) — the others stay in the graph's static buffers. Where capture failed, the function
        runs eagerly on the caller's stream."""
        caller = torch.cuda.current_stream(self.device)
        with self._lock:
            key = signature(inputs)
            if not self.broken and key not in self._graphs:
                self.stream.wait_stream(caller)
                with CAPTURE.capturing(), torch.cuda.stream(self.stream):
                    self._graphs[key] = self._capture(inputs)
                caller.wait_stream(self.stream)
            entry = None if self.broken else self._graphs[key]
            with CAPTURE.running():
                if entry is None:
                    return {name: out for name, out in self.function(inputs).items() if read is None or name in read}
                return self._replay(entry, inputs, caller, read)

    def _replay(self, entry: _Captured, inputs: Tensors, caller: torch.cuda.Stream,
                read: Collection[str] | None) -> dict[str, torch.Tensor]:
        """The inputs copied into the graph's static buffers, one replay, the outputs read copied out."""
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            for name, static in entry.inputs.items():
                if static is not None:
                    static.copy_(inputs[name])  # type: ignore[arg-type]
            entry.graph.replay()
        caller.wait_stream(self.stream)
        copies = {name: out.clone() for name, out in entry.outputs.items() if read is None or name in read}
        self.stream.wait_stream(caller)  # the next replay, from any thread, waits for these copies
        return copies

    def _capture(self, inputs: Tensors) -> _Captured | None:
        """Static copies of the inputs, warm-up runs, then one captured run whose outputs stay static; None, with
        one warning giving the run's own error, where the run fails inside the capture (e.g. TensorRT's
        enqueue returning False). If CUDA invalidated the capture (`capture_end` raises), torch's allocator
        cannot capture again in this process: every signature runs eagerly from then on (`broken`)."""
        static = {name: None if t is None else t.clone() for name, t in inputs.items()}
        for _ in range(WARMUP_RUNS):
            self.function(static)
        graph, failure = torch.cuda.CUDAGraph(), None
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                try:
                    outputs = dict(self.function(static))
                except Exception as exc:
                    failure = exc
        except Exception as exc:  # capture_end's own error, after (or instead of) the run's
            failure, self.broken = failure or exc, True
        if failure is None:
            return _Captured(graph, static, outputs)
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in inputs.items() if t is not None)[:120]
        scope = "every shape runs eagerly until the process restarts" if self.broken else \
            f"these shapes ({shapes}) run eagerly from now on"
        warnings.warn(f"CUDA graph capture failed ({str(failure).splitlines()[0][:160]}); {scope}",
                      RuntimeWarning, stacklevel=4)
        return None
