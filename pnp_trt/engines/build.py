"""`pnp-trt build`: compile an exported directory's ONNX graphs into TensorRT engines.

Strongly typed networks: the mixed-precision fp16 ONNX fixes every tensor's type, so the same code builds
on TensorRT 10.x and 11.x (11 removed the FP16 builder flag and weak typing).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tensorrt as trt

from ..contract import ModelDims, graph_specs
from ..errors import PnPError
from ..fileio import atomic_write
from ..manifest import GRAPHS, read_manifest, sha256
from .availability import require_tensorrt
from .compat import ENGINES_MANIFEST, EngineEntry, Platform, entries_json
from .profiles import BuildShapes, Profile, profile_shapes

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


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


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
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _parse(builder, onnx_path, logger)
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    monitor = BuildProgress(on_step)
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PnPError(f"TensorRT could not build {onnx_path.name} (see its log above); try a smaller "
                       "--max-size/--max-batch or a lower --optimization-level")
    _write_atomic(engine_path, bytes(memoryview(serialized)))
    if timing_cache:
        _write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))


def build_all(directory: Path, shapes: BuildShapes, optimization_level: int = 3, timing_cache: Path | None = None,
              on_graph: Callable[[str], None] = lambda graph: None,
              on_step: PhaseCallback = lambda phase, step, total: None) -> dict[str, EngineEntry]:
    """Build every graph's engine next to its ONNX and record them in engines.json (written last)."""
    require_tensorrt("pnp-trt build")
    manifest = read_manifest(directory)
    dims = ModelDims.from_dict(manifest["dims"])
    shapes.check(dims.size_multiple)
    specs, here, entries = graph_specs(dims), current_platform(), {}
    for graph in GRAPHS:
        on_graph(graph)
        engine = directory / f"{graph}.plan"
        build_engine(directory / f"{graph}.onnx", engine, profile_shapes(specs[graph], dims, shapes),
                     optimization_level, timing_cache, on_step)
        entries[graph] = EngineEntry(graph, engine.name, sha256(engine), manifest["files"][f"{graph}.onnx"]["sha256"],
                                     here, shapes)
    _write_atomic(directory / ENGINES_MANIFEST, entries_json(entries).encode())
    return entries
