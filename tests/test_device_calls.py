"""What each UNet call moves (issue 8 §2.2, §4, §5): only the outputs the sampler reads come back, no host
array reaches a call inside the loops, and on a GPU the loops never wait for the device and run on the
worker's own stream."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import in_threads, random_image

from pnp_trt.config import TranslateConfig
from pnp_trt.contract import ModelDims, axis_sizes, captured_name, graph_specs
from pnp_trt.export.trace_feeds import random_feeds
from pnp_trt.images import load_guidance, to_array
from pnp_trt.runtime.backend import LoadedModel
from pnp_trt.runtime.onnxruntime_backend import open_onnxruntime
from pnp_trt.runtime.sampler import InjectionPlan, Sampler, Stats, inject, prepare_source
from pnp_trt.runtime.torch_backend import open_torch
from pnp_trt.runtime.translation import translate
from pnp_trt.schedule import sampling_timesteps

SIZE = (64, 64)
CONFIG = TranslateConfig(steps=4, feature_injection=0.25, attention_injection=0.5, height=SIZE[0], width=SIZE[1])
POINTS = ModelDims(77, 32, 4, 8, (32, 32, 64, 64)).points
"""The tiny SD model's injection points (the SD family's default preset)."""
PARTIAL = ("noise_pred", captured_name(POINTS[0]), captured_name(POINTS[-1]))


class CallLog:
    """Wraps a real backend; records what each UNet call was fed and asked for."""

    def __init__(self, backend: Any, read_all: bool = False):
        self.backend, self.read_all, self.calls = backend, read_all, list[dict[str, Any]]()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def run(self, graph: str, feeds: Mapping[str, Any], outputs: Collection[str] | None = None) -> dict[str, Any]:
        if graph != "unet":
            return self.backend.run(graph, feeds, outputs)
        self.calls.append({"outputs": outputs, "feeds": dict(feeds),
                           "stream": torch.cuda.current_stream() if torch.cuda.is_available() else None})
        result = self.backend.run(graph, feeds, None if self.read_all else outputs)
        if outputs is not None and not self.read_all:
            assert set(result) == set(outputs), "a backend returned other outputs than asked"
        return result


def logged(model: LoadedModel, read_all: bool = False) -> LoadedModel:
    return dataclasses.replace(model, backend=CallLog(model.backend, read_all))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny32(tiny_model_dir: Path) -> LoadedModel:
    return open_torch(str(tiny_model_dir), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_unet_call_returns_just_the_outputs_asked(backend: str, tiny32: LoadedModel, exported: Path) -> None:
    model = tiny32 if backend == "torch" else open_onnxruntime(exported)
    feeds = random_feeds(graph_specs(model.dims)["unet"], axis_sizes(model.dims, 2, *SIZE), "float32")
    everything = model.backend.run("unet", feeds)
    partial = model.backend.run("unet", feeds, PARTIAL)
    assert list(partial) == list(PARTIAL)
    for name in PARTIAL:
        np.testing.assert_array_equal(model.backend.to_numpy(partial[name]), model.backend.to_numpy(everything[name]))
    with pytest.raises(ValueError, match="no output"):
        model.backend.run("unet", feeds, ["captured_nowhere"])


def test_hooks_keep_only_what_is_read(tiny32: LoadedModel) -> None:
    """The torch UNet graph does not hold captured tensors nobody reads (they are freed layer by layer)."""
    spec = graph_specs(tiny32.dims)["unet"]
    feeds = random_feeds(spec, axis_sizes(tiny32.dims, 1, *SIZE), "float32")
    with torch.inference_mode():
        outputs = tiny32.backend.graphs["unet"](*(torch.as_tensor(feeds[t.name]) for t in spec.inputs),  # type: ignore[attr-defined]
                                                keep=frozenset(PARTIAL[1:]))
    kept = [name for name, out in zip(spec.output_names, outputs, strict=True) if out is not None]
    assert kept == list(PARTIAL)


def test_the_sampler_asks_only_for_what_it_reads(tiny32: LoadedModel, tmp_path: Path) -> None:
    """Inversion and injection read noise_pred alone; capture calls read only the points their step injects;
    results equal those of a backend returning every output. No numpy array is fed to a UNet call: the
    timesteps are uploaded once per pass and the gates are the backend's own scalars."""
    image = load_guidance(random_image(tmp_path / "g.png", *SIZE))
    lean, full = logged(tiny32), logged(tiny32, read_all=True)
    a = translate(lean, ["a cat", "a dog"], CONFIG, image=image)
    b = translate(full, ["a cat", "a dog"], CONFIG, image=image)
    np.testing.assert_array_equal(a.latents, b.latents)
    calls = lean.backend.calls  # type: ignore[attr-defined]
    assert all(call["outputs"] is not None for call in calls)
    captures = [call for call in calls if set(call["outputs"]) != {"noise_pred"}]
    injecting = [call for call in calls if "inject_features" in call["feeds"]]
    assert captures and injecting and len(calls) == a.stats.unet_calls
    assert all(set(call["outputs"]) == {"noise_pred"} for call in injecting)
    plan = InjectionPlan.of(CONFIG, POINTS)
    captured_per_call = sorted(len(set(call["outputs"]) - {"noise_pred"}) for call in captures)
    assert captured_per_call == sorted(len(plan.points_at(i)) for i in range(plan.capture_steps))
    for call in calls:
        hosted = [name for name, value in call["feeds"].items() if isinstance(value, np.ndarray)]
        assert not hosted, f"host arrays fed to a UNet call: {hosted}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_sampling_loops_never_wait_for_the_gpu(tiny_model_dir: Path, tmp_path: Path, cuda_graphs: bool) -> None:
    """Under `set_sync_debug_mode("error")` any host–device synchronization raises: encode, invert, capture
    and inject run without one (after a warm-up that captures the CUDA graphs); only decoding syncs."""
    model = open_torch(str(tiny_model_dir), torch.device("cuda"), torch.float32, cuda_graphs=cuda_graphs)
    image = load_guidance(random_image(tmp_path / "g.png", *SIZE))
    translate(model, ["a cat"], CONFIG, image=image)
    pixels = to_array(image, SIZE)
    with model.backend.worker_stream():
        sampler = Sampler(model, Stats())  # no per-stage timing syncs
        torch.cuda.set_sync_debug_mode("error")
        try:
            source = prepare_source(sampler, CONFIG, SIZE, pixels, None)
            inject(sampler.unet, model.backend, model.schedule, source.start, source.captured,
                   sampler.encode_prompts([""]), sampler.encode_prompts(["a cat"]), CONFIG.guidance_scale,
                   sampling_timesteps(model.schedule, CONFIG.steps), InjectionPlan.of(CONFIG, POINTS), sampler.gates)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        model.backend.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_each_worker_runs_on_its_own_stream(tiny_model_dir: Path, tmp_path: Path) -> None:
    """No UNet call of a translate is enqueued on the legacy default stream (which synchronizes with all)."""
    model = logged(open_torch(str(tiny_model_dir), torch.device("cuda"), torch.float32))
    image = load_guidance(random_image(tmp_path / "g.png", *SIZE))
    in_threads([lambda: translate(model, ["a cat"], CONFIG, image=image)] * 2)
    streams = {call["stream"] for call in model.backend.calls}  # type: ignore[attr-defined]
    assert torch.cuda.default_stream() not in streams and len(streams) == 2


def test_the_callers_model_is_left_as_it_was(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One loaded model behind two torch backends gets one set of hooks, gone with the last backend (and after
    an export); the export's GroupNorm swap is undone, even when the block fails."""
    from pnp_trt.export.exporter import export_loaded
    from pnp_trt.export.stable_norm import TwoPassGroupNorm, two_pass_group_norms
    from pnp_trt.models import load_diffusers
    from pnp_trt.runtime.torch_backend import open_torch

    model = load_diffusers(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    points = [dict(model.unet.named_modules())[p.module] for p in model.dims.points]
    first, second = open_torch(model), open_torch(model)
    assert [len(point._forward_hooks) for point in points] == [1] * len(points)
    del first
    gc.collect()
    assert [len(point._forward_hooks) for point in points] == [1] * len(points)
    del second
    gc.collect()
    assert not any(point._forward_hooks for point in points)
    export_loaded(model, tmp_path / "exported")
    assert not any(point._forward_hooks for point in points)
    before = list(model.unet.named_modules()) + list(model.vae.named_modules())
    with pytest.raises(RuntimeError), two_pass_group_norms(model.unet, model.vae) as swapped:
        assert swapped > 0 and any(isinstance(m, TwoPassGroupNorm) for m in model.unet.modules())
        raise RuntimeError("export failed")
    assert list(model.unet.named_modules()) + list(model.vae.named_modules()) == before


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_uploaded_scalars_keep_their_shape(backend: str, tiny32: LoadedModel, exported: Path) -> None:
    """The gates are 0-d in the contract: a TensorRT input or a CUDA-graph buffer of shape () refuses (1,)."""
    model = tiny32 if backend == "torch" else open_onnxruntime(exported)
    assert tuple(model.backend.asarray(np.array(True)).shape) == ()
    assert tuple(model.backend.asarray(np.zeros((2, 3), np.float32)).shape) == (2, 3)


def test_a_graph_collected_while_hooks_are_installed_does_not_deadlock(tiny_model_dir: Path, monkeypatch) -> None:
    """A graph left in a reference cycle is finalized by whatever garbage collection comes next, possibly one
    inside `install_hooks` on the same thread: its `release_hooks` must not wait on the lock that thread holds."""
    import copy
    import threading

    from pnp_trt import injection
    from pnp_trt.models import load_diffusers
    from pnp_trt.torch_graphs import PnPUNetGraph

    model = load_diffusers(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    unet, dims = model.unet, model.dims
    other = copy.deepcopy(unet)
    gc.disable()
    try:
        graph = PnPUNetGraph(unet, dims)
        graph.cycle = [graph]  # cyclic garbage once dropped: only a collection finalizes it
        del graph
        real_missing_layers = injection.missing_layers
        monkeypatch.setattr(injection, "missing_layers",
                            lambda u, points: (gc.collect(), real_missing_layers(u, points))[1])
        worker = threading.Thread(target=injection.install_hooks, args=(other, dims.points), daemon=True)
        worker.start()
        worker.join(20)
    finally:
        gc.enable()
    assert not worker.is_alive(), "install_hooks deadlocked on a finalizer's release_hooks"
    assert not any(m._forward_hooks for m in unet.modules()) and any(m._forward_hooks for m in other.modules())


def _same_memory(a: Any, b: Any) -> bool:
    return np.shares_memory(a, b) if isinstance(a, np.ndarray) else a.untyped_storage().data_ptr() == \
        b.untyped_storage().data_ptr()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_the_arrays_a_run_returns_are_the_callers(backend: str, tiny32: LoadedModel, exported: Path) -> None:
    """The Backend contract: `run`'s arrays belong to the caller (the sampler keeps captured features, text
    embeddings and latents across many calls); a second run neither writes into them nor returns them again.
    The TensorRT backend wrote `noise_pred` into a reused buffer: it now allocates every output read, and its
    CUDA-graph path copies outputs out, as torch's does."""
    model = tiny32 if backend == "torch" else open_onnxruntime(exported)
    spec = graph_specs(model.dims)["unet"]
    feeds = random_feeds(spec, axis_sizes(model.dims, 2, *SIZE), "float32", 0, 10)
    feeds = {name: model.backend.asarray(value) for name, value in feeds.items()}
    first = model.backend.run("unet", feeds)
    kept = {name: model.backend.to_numpy(array).copy() for name, array in first.items()}
    second = model.backend.run("unet", {**feeds, "sample": model.backend.asarray(np.zeros_like(
        model.backend.to_numpy(feeds["sample"])))})
    for name, array in first.items():
        np.testing.assert_array_equal(model.backend.to_numpy(array), kept[name])
        assert not _same_memory(array, second[name]), name


def test_a_feed_the_graph_lacks_is_refused_by_every_backend(tiny32: LoadedModel, exported: Path) -> None:
    """A misspelt feed name was dropped silently (the UNet ran uninjected); the contract now refuses it."""
    for model in (tiny32, open_onnxruntime(exported)):
        with pytest.raises(ValueError, match="unet has no input.s. injected_featur"):
            model.backend.run("unet", {"sample": model.backend.asarray(np.zeros((1, 4, 8, 8), np.float32)),
                                       "injected_featur": model.backend.asarray(np.zeros(1, np.float32))})


def test_a_capture_waits_for_the_runs_under_way_and_holds_off_new_ones() -> None:
    """Issue 20 §3: no uncaptured device work may run anywhere in the process while a CUDA graph is captured.
    The capture lock lets runs share it, makes a capture wait for the runs under way, and holds new runs off
    until the capture is done. (Waits that must not end are given 0.2 s: a slow machine can only hide a bug.)"""
    import threading
    import time

    from pnp_trt.runtime.cuda_graphs import CaptureLock

    lock, order = CaptureLock(), list[str]()
    run_in, end_run, capture_in, end_capture = (threading.Event() for _ in range(4))

    def first_run() -> None:
        with lock.running():
            run_in.set()
            end_run.wait(10)
            order.append("first run ends")

    def capture() -> None:
        with lock.capturing():
            order.append("capture")
            capture_in.set()
            end_capture.wait(10)
            order.append("capture ends")

    def second_run() -> None:
        with lock.running():
            order.append("second run")

    threads = [threading.Thread(target=f) for f in (first_run, capture, second_run)]
    threads[0].start()
    assert run_in.wait(10)
    threads[1].start()
    deadline = time.monotonic() + 10
    while not lock._capturing and time.monotonic() < deadline:  # the capture is waiting for the first run
        time.sleep(0.01)
    threads[2].start()
    assert not capture_in.wait(0.2) and order == []
    end_run.set()
    assert capture_in.wait(10)
    time.sleep(0.2)
    assert order == ["first run ends", "capture"]  # the second run waits for the capture
    end_capture.set()
    for thread in threads:
        thread.join(10)
    assert order == ["first run ends", "capture", "capture ends", "second run"]


def test_the_capture_lock_never_waits_for_itself() -> None:
    """A run nested in a run of the same thread goes ahead even while a capture waits (it would wait for itself);
    a capture started inside a run is a programming error raised at once; an interrupted capture frees the lock."""
    import threading

    from pnp_trt.runtime.cuda_graphs import CaptureLock

    lock, nested, waiting = CaptureLock(), threading.Event(), threading.Event()
    with lock.running():
        capture = threading.Thread(target=lambda: lock.capturing().__enter__() and None)
        capture.daemon = True
        capture.start()
        while not lock._capturing:
            waiting.wait(0.01)
        with lock.running():
            nested.set()
        with pytest.raises(RuntimeError, match="inside a run"), lock.capturing():
            pass
    capture.join(10)
    assert nested.is_set() and not capture.is_alive()
    interrupted = CaptureLock()
    interrupted._running = 1  # a run under way on another thread
    waits = iter([True])  # the first wait (no other capture) passes; the wait for the run is interrupted
    interrupted._state.wait_for = lambda predicate: next(waits, None) or (_ for _ in ()).throw(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt), interrupted.capturing():
        pass
    assert not interrupted._capturing and next(waits, "spent") == "spent"
