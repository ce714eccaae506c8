"""An exported directory opened once for every backend: manifest (schema-checked), injection points,
tokenizer and scheduler, each missing or malformed part a one-line error with the command that rebuilds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contract import ModelDims
from ..errors import PnPError
from ..manifest import GRAPHS, check_graph_file, file_hashes_differ, read_manifest, rebuild_hint
from ..schedule import Schedule
from ..tokenizer import PromptTokenizer


@dataclass(frozen=True)
class Exported:
    directory: Path
    manifest: dict[str, Any]
    dims: ModelDims
    tokenizers: dict[str, PromptTokenizer]
    """By text encoder graph input, as `LoadedModel.tokenizers`."""
    schedule: Schedule

    def identity(self, runtime: str) -> str:
        """What the model is, for outputs and cache keys: id, runtime, precision, weights hash and the export's
        id (which every graph loaded is checked to carry)."""
        m = self.manifest
        return (f"{m['model_id']} ({runtime} {m['precision']}, weights {m['weights_sha256'][:12]}, "
                f"export {m['export_id'][:12]})")


def open_exported(directory: Path | str) -> Exported:
    """An exported directory, every check that loading makes done before any graph is loaded: the manifest,
    its files, tokenizers, scheduler, and each graph's identity stamps (an edited manifest is named as such,
    not blamed on the settings it misleads)."""
    exported = _read_exported(Path(directory))
    _check_graphs(exported)
    return exported


def _read_exported(directory: Path) -> Exported:
    manifest = read_manifest(directory)
    rebuild = rebuild_hint(manifest, directory)
    try:
        dims = ModelDims.from_dict(manifest["dims"])
        family = dims.model_family
        tokenizers = {name: PromptTokenizer.from_file(directory / f"{file}.json", manifest[file])
                      for name, file in zip(family.text_inputs, family.tokenizer_names, strict=True)}
        scheduler = json.loads((directory / "scheduler_config.json").read_text())
        if not isinstance(scheduler, dict):
            raise PnPError(f"{directory / 'scheduler_config.json'} is not a JSON object; rebuild with `{rebuild}`")
        try:
            schedule = Schedule.from_config(scheduler)
        except PnPError as exc:
            raise PnPError(f"{directory / 'scheduler_config.json'}: {exc}; rebuild with `{rebuild}`") from None
    except PnPError:
        raise
    except Exception as exc:  # tokenizers, json and the config readers raise their own types
        raise PnPError(f"{directory} is incomplete or damaged ({type(exc).__name__}: {str(exc)[:120]}); "
                       f"rebuild with `{rebuild}`") from None
    for graph in GRAPHS:
        outside = external_data_outside(directory / f"{graph}.onnx")
        if outside:
            raise PnPError(f"{directory / graph}.onnx keeps weights outside its directory ({outside}); refusing "
                           f"to read them: rebuild with `{rebuild}`")
    if [p.name for p in dims.points] != manifest["injection_points"]:
        raise PnPError(f"{directory} was exported with other injection points; rebuild with `{rebuild}`")
    return Exported(directory, manifest, dims, tokenizers, schedule)


def verify_exported(directory: Path | str) -> list[str]:
    """All that loading checks (the manifest's content, tokenizers, scheduler), every file's sha256, then each
    graph's identity stamps: the names of the files that differ from the manifest, or a refusal."""
    exported = _read_exported(Path(directory))
    differ = file_hashes_differ(exported.directory, exported.manifest)
    if differ:
        return differ
    _check_graphs(exported)
    return []


def _check_graphs(exported: Exported) -> None:
    for graph in GRAPHS:
        check_graph_file(exported.directory / f"{graph}.onnx", exported.manifest)


EXTERNAL_LOCATION = b"\x0a\x08location"
"""How a protobuf-encoded external-data entry's key starts (field 1, 8 bytes, "location")."""


def external_data_outside(path: Path) -> str | None:
    """The first external-data location of an ONNX file that leads outside its directory (ONNX Runtime
    before 1.32 follows such paths), or None."""
    import mmap

    import onnx

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data.find(EXTERNAL_LOCATION) < 0:  # no external data: no need to parse a multi-GB graph
            return None
    root = path.parent.resolve()
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and (Path(entry.value).is_absolute()
                                            or not (root / entry.value).resolve().is_relative_to(root)):
                return entry.value
    return None
