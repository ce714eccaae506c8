"""Engine manifest entries and the rules for using an engine here (pure Python, unit-tested).

An engine is tied to its TensorRT version, the GPU's compute capability (an H100 PCIe and an H100 SXM share
engines; TensorRT itself refuses a plan it cannot run) and its source ONNX; a mismatch is one clear line
saying what differs and the command that rebuilds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import PnPError
from .profiles import BuildShapes

ENGINES_MANIFEST = "engines.json"
ENGINES_FORMAT = 2
"""2: each entry records the export id of the ONNX it was built from."""


@dataclass(frozen=True)
class Platform:
    """What an engine is built for."""

    tensorrt: str
    gpu: str
    compute_capability: str


@dataclass(frozen=True)
class EngineEntry:
    graph: str
    file: str
    sha256: str
    onnx_sha256: str
    export_id: str
    platform: Platform
    shapes: BuildShapes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "platform": asdict(self.platform), "shapes": self.shapes.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineEntry:
        return cls(data["graph"], data["file"], data["sha256"], data["onnx_sha256"], data["export_id"],
                   Platform(**data["platform"]), BuildShapes.from_dict(data["shapes"]))


def build_command(directory: Path, shapes: BuildShapes) -> str:
    s = shapes
    return (f"pnp-trt build {directory} --opt-batch {s.opt_batch} --max-batch "
            f"{s.max_batch} --min-size {s.min_size[0]}x{s.min_size[1]} --opt-size {s.opt_size[0]}x{s.opt_size[1]} "
            f"--max-size {s.max_size[0]}x{s.max_size[1]}")


def check_entry(entry: EngineEntry, here: Platform, onnx_sha256: str, export_id: str, directory: Path) -> None:
    """Refuse an engine built elsewhere or from another ONNX or export, naming the difference."""
    rebuild = build_command(directory, entry.shapes)
    built, now = entry.platform, here
    if built.tensorrt != now.tensorrt:
        raise PnPError(f"{entry.file} was built with TensorRT {built.tensorrt}, this machine has {now.tensorrt}; "
                       f"rebuild: `{rebuild}`")
    if built.compute_capability != now.compute_capability:
        raise PnPError(f"{entry.file} was built for {built.gpu} (sm {built.compute_capability}), this GPU is "
                       f"{now.gpu} (sm {now.compute_capability}); rebuild: `{rebuild}`")
    if entry.onnx_sha256 != onnx_sha256 or entry.export_id != export_id:
        raise PnPError(f"{entry.file} was built from another {entry.graph}.onnx (re-exported since); "
                       f"rebuild: `{rebuild}`")


def read_entries(directory: Path) -> dict[str, EngineEntry]:
    path = Path(directory) / ENGINES_MANIFEST
    if not path.is_file():
        raise PnPError(f"{directory} has no TensorRT engines ({ENGINES_MANIFEST} missing); build them with "
                       f"`pnp-trt build {directory}`")
    data = json.loads(path.read_text())
    if data.get("format_version") != ENGINES_FORMAT:
        raise PnPError(f"{path} has format {data.get('format_version')}, this pnp-trt reads {ENGINES_FORMAT}; "
                       f"rebuild with `pnp-trt build {directory}`")
    return {graph: EngineEntry.from_dict(entry) for graph, entry in data["engines"].items()}


def entries_json(entries: dict[str, EngineEntry]) -> str:
    return json.dumps({"format_version": ENGINES_FORMAT,
                       "engines": {g: e.to_dict() for g, e in entries.items()}}, indent=2)
