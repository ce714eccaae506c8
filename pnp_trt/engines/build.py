"""`pnp-trt build`: compile an exported directory's ONNX graphs into TensorRT engines.

Strongly typed networks: the mixed-precision fp16 ONNX fixes every tensor's type, so the same code builds
on TensorRT 10.x and 11.x (11 removed the FP16 builder flag and weak typing).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tensorrt as trt
from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath, PostprocessConfig, engine_bytes_from_network
from polygraphy.backend.trt import Profile as PolygraphyProfile
from polygraphy.backend.trt.util import get_trt_logger
from polygraphy.exception import PolygraphyException
from polygraphy.logger import G_LOGGER

from ..contract import ModelDims, graph_specs
from ..errors import PnPError
from ..fileio import atomic_write
from ..manifest import (
    GRAPHS,
    check_graph_file,
    read_manifest_for_tensorrt,
    require_tensorrt_attention,
    sha256,
)
from .availability import require_tensorrt
from .compat import ENGINES_MANIFEST, EngineEntry, Platform, entries_json
from .fusion import layers_file
from .profiles import BuildShapes, Profile, profile_shapes

LOGGER = get_trt_logger()
"""One TensorRT logger for the process, Polygraphy's: TensorRT wants one per process and the builds go
through Polygraphy, so the runtimes use the same."""
PhaseCallback = Callable[[str, int, int], None]
"""on_step(phase, step, total) during a build."""


class BuildProgress(trt.IProgressMonitor):
    """Forwards TensorRT's build phases to a callback (a progress bar in the CLI)."""

    def __init__(self, on_step: PhaseCallback):
        trt.IProgressMonitor.__init__(self)
        self.on_step = on_step
        self.totals: dict[str, int] = {}

    def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
        self.totals[phase_name] = num_steps
        self.on_step(phase_name, 0, num_steps)

    def step_complete(self, phase_name: str, step: int) -> bool:
        self.on_step(phase_name, step + 1, self.totals.get(phase_name, step + 1))
        return True

    def phase_finish(self, phase_name: str) -> None:
        total = self.totals.pop(phase_name, 0)
        self.on_step(phase_name, total, total)


def current_platform() -> Platform:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return Platform(trt.__version__, torch.cuda.get_device_name(), f"{major}.{minor}")


def _write_atomic(path: Path, data: Any) -> None:
    """Write bytes or a buffer (TensorRT's `IHostMemory`, without a second in-memory copy)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(memoryview(data)))


def build_engine(onnx_path: Path, engine_path: Path, layers_path: Path, profiles: list[Profile],
                 optimization_level: int, timing_cache: Path | None, on_step: PhaseCallback) -> None:
    """Build one engine with these optimization profiles through Polygraphy's loaders, and write its layer
    information (which kernels run what) to `layers_path`; reuse the timing cache and update it once the plan
    is written (best effort: a cache that cannot be saved only warns). fp32 layers (the fp16 graphs' fp32
    islands, fp32 exports) build without TF32, as ONNX Runtime runs them."""
    used: list[trt.IBuilderConfig] = []

    def with_timing_cache(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig) -> None:
        _use_timing_cache(config, timing_cache)
        used.append(config)

    config = CreateConfig(profiles=[polygraphy_profile(p) for p in profiles], progress_monitor=BuildProgress(on_step),
                          builder_optimization_level=optimization_level, tf32=False,
                          profiling_verbosity=trt.ProfilingVerbosity.DETAILED)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)  # lazy: parse errors land below
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):  # Polygraphy's own progress lines would break the bars
            serialized = engine_bytes_from_network(network, PostprocessConfig(config, with_timing_cache))
    except PolygraphyException as exc:
        raise PnPError(f"TensorRT could not build {onnx_path.name} ({str(exc).splitlines()[0][:200]}); re-export "
                       "it with `pnp-trt export`, or try a smaller --max-size/--max-batch or a lower "
                       "--optimization-level") from None
    _write_atomic(engine_path, serialized)
    try:  # diagnostic only: a plan that is built stays built
        _write_atomic(layers_path, layer_information(serialized).encode())
    except Exception as exc:
        warnings.warn(f"could not read {engine_path.name}'s layer information ({str(exc)[:120]}); the engine "
                      "is built", stacklevel=2)
    if timing_cache and used:
        _save_timing_cache(used[0], timing_cache)


def layer_information(serialized: Any) -> str:
    """The engine inspector's JSON for a serialized plan (detailed: built with ProfilingVerbosity.DETAILED)."""
    engine = trt.Runtime(LOGGER).deserialize_cuda_engine(serialized)
    if engine is None:
        raise PnPError("TensorRT could not load the engine it just built; see its log above")
    information = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    del engine  # its weights leave the GPU before the next graph builds
    return information


def polygraphy_profile(profile: Profile) -> Any:
    """One of our (min, opt, max) profiles as Polygraphy's `Profile`."""
    converted = PolygraphyProfile()
    for name, (low, opt, high) in profile.items():
        converted.add(name, min=low, opt=opt, max=high)
    return converted


def _use_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> None:
    """Start from the saved timing cache when TensorRT accepts it (one from another GPU or version is
    refused: then a fresh one, with a warning)."""
    saved = path.read_bytes() if path and path.is_file() else b""
    cache = config.create_timing_cache(saved)
    if cache is not None and config.set_timing_cache(cache, False):
        return
    if saved:
        warnings.warn(f"TensorRT refused the timing cache {path} (another GPU or TensorRT version?); "
                      "starting a fresh one", stacklevel=2)
    fresh = config.create_timing_cache(b"")
    if fresh is not None:
        config.set_timing_cache(fresh, False)


def _save_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    """Best effort: the engine is already written, so a cache that cannot be saved only warns."""
    cache = config.get_timing_cache()
    try:
        if cache is not None:
            _write_atomic(path, cache.serialize())
    except OSError as exc:
        warnings.warn(f"could not save the timing cache {path} ({exc}); the engine is built", stacklevel=2)


def build_all(directory: Path, shapes: BuildShapes, optimization_level: int = 3, timing_cache: Path | None = None,
              on_graph: Callable[[str], None] = lambda graph: None,
              on_step: PhaseCallback = lambda phase, step, total: None) -> dict[str, EngineEntry]:
    """Build every graph's engine next to its ONNX and record them in engines.json (written last). Plans are
    built under staging names and moved into place only once all four are built, each with its layer
    information (`engines/fusion.py` reads it)."""
    require_tensorrt("pnp-trt build")
    manifest = read_manifest_for_tensorrt(directory)
    require_tensorrt_attention(manifest, directory, trt.__version__)
    dims = ModelDims.from_dict(manifest["dims"])
    shapes.check(dims.size_multiple)
    specs, here, entries = graph_specs(dims), current_platform(), {}
    staged = {graph: directory / f".{graph}.plan.building" for graph in GRAPHS}
    staged_layers = {graph: directory / f".{graph}.layers.building" for graph in GRAPHS}
    try:
        for graph in GRAPHS:
            on_graph(graph)
            check_graph_file(directory / f"{graph}.onnx", manifest)
            build_engine(directory / f"{graph}.onnx", staged[graph], staged_layers[graph],
                         profile_shapes(specs[graph], dims, shapes), optimization_level, timing_cache, on_step)
            entries[graph] = EngineEntry(graph, f"{graph}.plan", sha256(staged[graph]),
                                         manifest["files"][f"{graph}.onnx"]["sha256"], manifest["export_id"], here,
                                         shapes)
        for graph, path in staged.items():  # the whole set or nothing: old plans stay with their record
            path.replace(directory / f"{graph}.plan")
            if staged_layers[graph].exists():
                staged_layers[graph].replace(layers_file(directory, graph))
    finally:
        for path in (*staged.values(), *staged_layers.values()):
            path.unlink(missing_ok=True)
    _write_atomic(directory / ENGINES_MANIFEST, entries_json(entries).encode())
    return entries
