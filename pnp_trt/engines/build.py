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

from ..contract import ModelDims, graph_specs
from ..errors import PnPError
from ..fileio import atomic_write
from ..manifest import GRAPHS, read_manifest, sha256
from .availability import require_tensorrt
from .compat import ENGINES_MANIFEST, EngineEntry, Platform, entries_json
from .profiles import BuildShapes, Profile, profile_shapes

LOGGER = trt.Logger(trt.Logger.WARNING)
"""One TensorRT logger for the process (builds and runtimes alike)."""
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


def _parse(builder: trt.Builder, onnx_path: Path, logger: trt.ILogger) -> trt.INetworkDefinition:
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise PnPError(f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}; re-export with `pnp-trt export`")
    return network


def build_engine(onnx_path: Path, engine_path: Path, shapes: Profile,
                 optimization_level: int, timing_cache: Path | None, on_step: PhaseCallback) -> None:
    """Build one engine with one optimization profile; reuse and update the timing cache."""
    builder = trt.Builder(LOGGER)
    network = _parse(builder, onnx_path, LOGGER)
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
    config.add_optimization_profile(profile)
    _use_timing_cache(config, timing_cache)
    monitor = BuildProgress(on_step)
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PnPError(f"TensorRT could not build {onnx_path.name} (see its log above); try a smaller "
                       "--max-size/--max-batch or a lower --optimization-level")
    _write_atomic(engine_path, serialized)
    if timing_cache:
        _save_timing_cache(config, timing_cache)


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
    built under staging names and moved into place only once all four are built."""
    require_tensorrt("pnp-trt build")
    manifest = read_manifest(directory)
    dims = ModelDims.from_dict(manifest["dims"])
    shapes.check(dims.size_multiple)
    specs, here, entries = graph_specs(dims), current_platform(), {}
    staged = {graph: directory / f".{graph}.plan.building" for graph in GRAPHS}
    try:
        for graph in GRAPHS:
            on_graph(graph)
            build_engine(directory / f"{graph}.onnx", staged[graph], profile_shapes(specs[graph], dims, shapes),
                         optimization_level, timing_cache, on_step)
            entries[graph] = EngineEntry(graph, f"{graph}.plan", sha256(staged[graph]),
                                         manifest["files"][f"{graph}.onnx"]["sha256"], here, shapes)
        for graph, path in staged.items():  # the whole set or nothing: old plans stay with their record
            path.replace(directory / f"{graph}.plan")
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    _write_atomic(directory / ENGINES_MANIFEST, entries_json(entries).encode())
    return entries
