"""The exported directory's manifest: what was exported, from what, and checks on loading it.

Loading checks presence, sizes and the format version (fast even with multi-GB graphs); `verify`
checks every file's sha256 on demand.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from . import validation
from .contract import PRECISIONS, TOLERANCE, ModelDims, graph_specs
from .engines.availability import TENSORRT_ATTENTION, tensorrt_release
from .errors import PnPError
from .families import FAMILIES, SD

PRESET_NAMES = {name for family in FAMILIES.values() for name in family.presets}
DEFAULT_PRESET = SD.default_preset

FORMAT_VERSION = 4
"""2: the UNet takes one timestep per sample (`timestep [batch]`), so one call can hold several timesteps.
3: an `export_id`, also written into every graph's own metadata (`EXPORT_ID_KEY`), checked at load.
4: the model family and injection preset in `dims` (SDXL: a second tokenizer, `tokenizer_2`)."""
READABLE_FORMATS = (3, 4)
"""Format 3 directories are SD 1.x/2.x exports with the default preset: they load unchanged."""
EXPORT_ID_KEY = "pnp_trt.export_id"
"""The ONNX metadata key under which each graph carries the id of the export that wrote it."""
EXPORT_DIMS_KEY = "pnp_trt.dims"
"""The ONNX metadata key under which each graph carries the model dims it was exported for (JSON): a manifest
whose `dims` were edited (a VAE factor, a native size) disagrees with its own graphs."""
EXPORT_SETTINGS_KEY = "pnp_trt.settings"
"""The ONNX metadata key under which each graph carries the manifest's `STAMPED_SETTINGS` it was exported with
(JSON): a manifest claiming another attention or precision than its graphs hold is refused, not run."""
STAMPED_SETTINGS = ("precision", "attention", "opset", "vae_scaling_factor")
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
"""A manifest pnp-trt writes is a few KB; a larger file is not read (a sparse 6 GiB one ran out of memory)."""
GRAPHS = ("text_encoder", "vae_encoder", "vae_decoder", "unet")
ATTENTION = ("standard", "onnx", "onnxruntime")
"""How an export spells attention (`attention` in the manifest, absent: standard): plain ONNX ops, for every
backend; the ONNX standard's fused `Attention` (opset 23), for ONNX Runtime and TensorRT ≥ 10.14; or ONNX
Runtime's fused memory-efficient op, for ONNX Runtime only (`export/fused_attention.py`)."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in `directory` except the manifest itself."""
    return {p.relative_to(directory).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}


def rebuild_hint(manifest: dict[str, Any] | None, directory: Path, attention: str | None = None,
                 preset: str | None = None) -> str:
    """The export command that writes `directory` again from the manifest's model and settings (`attention`
    and `preset` instead of the manifest's, if given); values a tampered manifest holds that the exporter would
    refuse are left to their defaults."""
    model = (manifest or {}).get("model_id")
    model = model if isinstance(model, str) and model else "MODEL"
    precision = (manifest or {}).get("precision")
    precision = precision if precision in PRECISIONS else "fp32"
    attention = attention or (manifest or {}).get("attention")
    fused = f" --attention {attention}" if attention in ATTENTION and attention != "standard" else ""
    dims = (manifest or {}).get("dims")
    preset = preset or (dims.get("preset") if isinstance(dims, dict) else None)
    chosen = f" --injection-preset {preset}" if preset in PRESET_NAMES and preset != DEFAULT_PRESET else ""
    return f"pnp-trt export --model {model} --precision {precision}{fused}{chosen} --out {free_directory(directory)}"


def free_directory(directory: Path) -> Path:
    """`directory` if nothing is there (export refuses an existing --out), else the first free DIR-rebuilt-N,
    so that a printed hint runs as printed."""
    candidates = [directory, *(directory.with_name(f"{directory.name}-rebuilt{f'-{n}' if n else ''}")
                               for n in range(100))]
    return next((c for c in candidates if not os.path.lexists(c)), candidates[-1])


def require_tensorrt_attention(manifest: dict[str, Any], directory: Path, tensorrt_version: str | None = None) -> None:
    """Refuse an export whose attention TensorRT cannot parse: ONNX Runtime's fused op always, the standard
    `Attention` before TensorRT 10.14 (checked once `tensorrt_version` is known), saying which export suits."""
    attention = manifest.get("attention", "standard")
    standard = f"`{rebuild_hint(manifest, Path('NEW_DIR'), 'standard')}` (--attention standard)"
    if attention == "onnxruntime":
        raise PnPError(f"{directory} was exported with --attention onnxruntime, which only ONNX Runtime runs; "
                       f"for TensorRT export again with {standard}")
    if attention == "onnx" and tensorrt_version is not None \
            and tensorrt_release(tensorrt_version) < TENSORRT_ATTENTION:
        raise PnPError(f"{directory} was exported with --attention onnx, whose Attention op TensorRT parses from "
                       f"{'.'.join(map(str, TENSORRT_ATTENTION))} on; this is TensorRT {tensorrt_version}: upgrade "
                       f"TensorRT, or export for it with {standard}")


def read_manifest_for_tensorrt(directory: Path) -> dict[str, Any]:
    """`read_manifest`, refusing what TensorRT cannot build or run (checked before TensorRT is looked for)."""
    manifest = read_manifest(directory)
    require_tensorrt_attention(manifest, directory)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest, after checking format version, presence and sizes of every listed file."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise PnPError(f"exported directory {directory} {what}; pass the directory `pnp-trt export` wrote "
                       f"(`{rebuild_hint(None, directory)}`)")
    if path.exists() and not path.is_file():
        raise PnPError(f"{path} is not a regular file (a directory, FIFO or device); rebuild with "
                       f"`{rebuild_hint(None, directory)}`")
    if not path.is_file() and (directory / "model_index.json").is_file():
        export = rebuild_hint({"model_id": str(directory)}, directory.with_name(directory.name + "-onnx"))
        raise PnPError(f"{directory} is a diffusers model, not an exported directory; run it with --backend torch "
                       f"--model {directory}, or export it: `{export}`")
    if not path.is_file():
        raise PnPError(f"{directory} has no {MANIFEST}: it is not an exported directory; "
                       f"create one with `{rebuild_hint(None, directory)}`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise PnPError(f"{path} is {path.stat().st_size / 2**20:.0f} MiB, not a manifest (pnp-trt writes a few KB); "
                       f"rebuild with `{rebuild_hint(None, directory)}`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise PnPError(f"{path} is not valid JSON; rebuild with `{rebuild_hint(None, directory)}`") from None
    except OSError as exc:
        raise PnPError(f"cannot read {path} ({exc.strerror}); check its permissions") from None
    if not isinstance(manifest, dict):
        raise PnPError(f"{path} is not a manifest (a JSON object); rebuild with `{rebuild_hint(None, directory)}`")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_FORMATS:  # 3.0 is not format 3
        readable = " and ".join(map(str, READABLE_FORMATS))
        raise PnPError(f"{directory} has manifest format {version!r}, this pnp-trt reads formats {readable}; "
                       f"rebuild with `{rebuild_hint(manifest, directory)}`")
    problem = schema_problem(manifest, directory)
    if problem:
        raise PnPError(f"{path} is malformed ({problem}); rebuild with `{rebuild_hint(manifest, directory)}`")
    root = directory.resolve()
    for name, entry in manifest["files"].items():
        file = directory / name
        if not file.resolve().is_relative_to(root) or file.is_symlink():
            raise PnPError(f"{file} is a link (to {os.path.realpath(file)}); an exported directory holds its own "
                           f"files: rebuild with `{rebuild_hint(manifest, directory)}`")
        if not file.is_file():
            what = "is not a regular file" if os.path.lexists(file) else "is missing"
            raise PnPError(f"{file} {what}; rebuild with `{rebuild_hint(manifest, directory)}`")
        if file.stat().st_size != entry["bytes"]:
            raise PnPError(f"{file} is {file.stat().st_size} bytes, the manifest says {entry['bytes']} "
                           f"(truncated or replaced); rebuild with `{rebuild_hint(manifest, directory)}`")
        if not name.endswith(GRAPH_SUFFIXES) and entry["bytes"] <= HASHED_AT_LOAD and _differs(directory, name, entry):
            raise PnPError(f"{file} differs from the sha256 in the manifest (edited or replaced); rebuild with "
                           f"`{rebuild_hint(manifest, directory)}`")
    return manifest


GRAPH_SUFFIXES = (".onnx", ".onnx.data", ".engine", ".plan")
"""Graphs and engines carry their export's identity in their own metadata (checked as they load), so start-up
never hashes them; every other file of an export (scheduler, tokenizers: a few MB) is hashed on every load."""
HASHED_AT_LOAD = 64 * 2**20


def _differs(directory: Path, name: str, entry: dict[str, Any]) -> bool:
    """Whether the file's sha256 differs from its manifest entry (an unreadable file: one line)."""
    try:
        return sha256(Path(directory) / name) != entry["sha256"]
    except OSError as exc:
        raise PnPError(f"cannot read {exc.filename} ({exc.strerror}); check its permissions") from None


SCHEMA: dict[str, type | tuple[type, ...]] = {
    "model_id": str, "export_id": str, "weights_sha256": str, "dims": dict, "precision": str, "injection_points": list,
    "tokenizer": dict, "files": dict,
}
"""Top-level keys a backend reads, with their JSON types. `vae_scaling_factor`, `opset` and `graphs` are recorded
for people and tools (the scaling is inside the VAE graphs, the I/O is read from the graphs themselves), and
checked all the same: a manifest says only what is true of its export."""


def contract_record(dims: ModelDims) -> dict[str, Any]:
    """The `graphs` record of an export with these dims: every graph's inputs and outputs, as JSON holds them."""
    return json.loads(json.dumps({name: {"inputs": [vars(t) for t in spec.inputs],
                                         "outputs": [vars(t) for t in spec.outputs]}
                                  for name, spec in graph_specs(dims).items()}))


def schema_problem(manifest: dict[str, Any], directory: Path) -> str | None:
    """What is wrong with a manifest's structure (None when nothing): missing or mistyped keys, file entries
    without sha256/bytes, and file names that would lead outside `directory`."""
    for key, kind in SCHEMA.items():
        if not isinstance(manifest.get(key), kind):
            return f"`{key}` is missing or not a {getattr(kind, '__name__', kind)}"
    try:
        dims = ModelDims.from_dict(manifest["dims"])
        validation.number("vae_scaling_factor", manifest.get("vae_scaling_factor"), 1e-6, 1e3)
        validation.integer("opset", manifest.get("opset"), 7, 30)
        for name in dims.model_family.tokenizer_names:
            tokenizer = manifest.get(name)
            if not isinstance(tokenizer, dict):
                return f"`{name}` is missing or not a dict"
            length = validation.integer(f"{name}.max_length", tokenizer.get("max_length"), 1, 1024)
            if length != dims.text_length:
                return f"`{name}.max_length` {length} differs from `dims.text_length` {dims.text_length}"
            validation.integer(f"{name}.pad_id", tokenizer.get("pad_id"), 0, 2**31 - 1)
            validation.text(f"{name}.pad_token", tokenizer.get("pad_token"), limit=None)
    except PnPError as exc:
        return str(exc)
    if manifest["format_version"] == 3 and dims.family != "sd":
        return "format 3 held only SD 1.x/2.x exports, and these dims say " + dims.family
    if manifest.get("graphs") != contract_record(dims):
        return "`graphs` is not the I/O contract of these dims (edited, or from another export)"
    if not re.fullmatch(r"[0-9a-f]{32}", manifest["export_id"]):
        return f"`export_id` is {manifest['export_id'][:40]!r}, not 32 hex digits"
    if not re.fullmatch(r"[0-9a-f]{64}", manifest["weights_sha256"]):
        return f"`weights_sha256` is {manifest['weights_sha256'][:40]!r}, not 64 hex digits"
    if manifest["precision"] not in PRECISIONS:
        return f"`precision` is {manifest['precision']!r}"
    if manifest.get("attention", "standard") not in ATTENTION:
        return f"`attention` is {manifest['attention']!r}"
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not isinstance(entry.get("bytes"), int):
            return f"the entry of {name!r} needs `sha256` and `bytes`"
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"file name {name!r} leads outside the directory"
    problem = _record_problem(manifest, TOLERANCE[manifest["precision"]])
    if problem:
        return problem
    needed = [*(f"{graph}.onnx" for graph in GRAPHS), "scheduler_config.json",
              *(f"{name}.json" for name in dims.model_family.tokenizer_names)]
    missing = [name for name in needed if name not in manifest["files"]]
    return f"no entry for {', '.join(missing)}" if missing else None


def _record_problem(manifest: dict[str, Any], tolerance: float) -> str | None:
    """What is wrong with the fields kept for people (`versions`, `validation_relative_error`: an error above the
    precision's tolerance would have failed the export), if anything."""
    versions = manifest.get("versions", {})
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        return "`versions` is not an object of version strings"
    errors = manifest.get("validation_relative_error", {})
    if not isinstance(errors, dict) or not all(
            isinstance(graph, dict) and all(type(e) in (int, float) and math.isfinite(e) and 0 <= e <= tolerance
                                            for e in graph.values()) for graph in errors.values()):
        return (f"`validation_relative_error` is not an object of graphs' finite errors within the tolerance "
                f"({tolerance:.0e}) the export held them to")
    return None


def check_graph_identity(metadata: dict[str, str], manifest: dict[str, Any], path: Path) -> None:
    """A graph carries the id of the export its manifest describes, and the dims it was exported for; another
    export's graph, a manifest copied from another export or one whose dims were edited is refused before it
    runs, cheaply (the graph's metadata, not a hash of the weights). Graphs of exports before the dims were
    stamped carry the id alone."""
    graph_id = metadata.get(EXPORT_ID_KEY)
    if graph_id != manifest["export_id"]:
        found = f"export {graph_id[:12]}" if graph_id else "no pnp-trt export id"
        raise PnPError(f"{path} does not belong to this export ({found}; {MANIFEST} says "
                       f"{manifest['export_id'][:12]}): files of different exports are mixed; rebuild with "
                       f"`{rebuild_hint(manifest, Path('NEW_DIR'))}`")
    claimed = {"dims": (EXPORT_DIMS_KEY, manifest["dims"]),
               "settings": (EXPORT_SETTINGS_KEY, exported_settings(manifest))}
    for label, (key, said) in claimed.items():
        stamped, said = metadata.get(key), _normalized(key, said)
        graph = None if stamped is None else _normalized(key, json.loads(stamped))
        if graph is not None and graph != {k: said.get(k) for k in graph}:  # what the graph carries (older: less)
            edited = sorted(k for k, v in graph.items() if said.get(k) != v)
            raise PnPError(f"{MANIFEST}'s {label} ({', '.join(edited) or 'their fields'}) disagree with those "
                           f"{path.name} was exported with: the manifest was edited; rebuild with "
                           f"`{rebuild_hint(manifest, Path('NEW_DIR'))}`")


def check_graph_file(path: Path, manifest: dict[str, Any]) -> None:
    """`check_graph_identity` on a graph file's stamps, before anything loads it; a file too damaged to carry
    any is left to its loader, which names the damage."""
    metadata = onnx_metadata(path)
    if metadata is not None:
        check_graph_identity(metadata, manifest, path)


def _normalized(key: str, stamp: dict[str, Any]) -> dict[str, Any]:
    """A stamp with its defaults filled in (dims stamped before format 4 lack the family and preset; settings
    stamped before the opset was, lack it)."""
    return ModelDims.from_dict(stamp).to_dict() if key == EXPORT_DIMS_KEY else stamp


def exported_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The settings each graph is stamped with (`EXPORT_SETTINGS_KEY`), as the manifest states them."""
    return {key: manifest.get(key, "standard" if key == "attention" else None) for key in STAMPED_SETTINGS}


def onnx_metadata(path: Path) -> dict[str, str] | None:
    """An ONNX file's metadata (the export id and dims pnp-trt stamps), read from the ModelProto's top-level
    fields alone: the graph's bytes are stepped over, not parsed, so every graph is checked cheaply before one
    is loaded. None: not such a protobuf (truncated, garbage), whose loader then names the damage."""
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return dict(_string_pairs(data, METADATA_FIELD))
    except (OSError, ValueError, IndexError):  # UnicodeDecodeError is a ValueError
        return None


METADATA_FIELD = 14
"""ModelProto.metadata_props: repeated StringStringEntryProto {key = 1, value = 2}."""


def _string_pairs(data: Any, field: int) -> list[tuple[str, str]]:
    pairs, at = [], 0
    while at < len(data):
        number, wire, at = _tag(data, at)
        if wire == 0:
            at = _varint(data, at)[1]
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        elif wire == 2:
            size, at = _varint(data, at)
            if at + size > len(data):
                raise ValueError("cut short")
            if number == field:
                entry = _fields(bytes(data[at:at + size]))
                pairs.append((entry.get(1, ""), entry.get(2, "")))
            at += size
        else:
            raise ValueError(f"wire type {wire}")
    return pairs


def _fields(message: bytes) -> dict[int, str]:
    """The text fields of a small message of text fields, by field number."""
    found, at = {}, 0
    while at < len(message):
        number, wire, at = _tag(message, at)
        if wire != 2:
            raise ValueError(f"wire type {wire}")
        size, at = _varint(message, at)
        found[number] = message[at:at + size].decode("utf-8")
        at += size
    return found


def _tag(data: Any, at: int) -> tuple[int, int, int]:
    key, at = _varint(data, at)
    if key >> 3 == 0:
        raise ValueError("field 0")
    return key >> 3, key & 7, at


def _varint(data: Any, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at
        if shift > 63:
            raise ValueError("varint too long")


def file_hashes_differ(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Names of files whose sha256 differs from the manifest (empty when all match)."""
    return [name for name, entry in manifest["files"].items() if _differs(directory, name, entry)]

