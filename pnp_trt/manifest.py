"""The exported directory's manifest: what was exported, from what, and checks on loading it.

Loading checks presence, sizes and the format version (fast even with multi-GB graphs); `verify`
checks every file's sha256 on demand.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import PnPError

FORMAT_VERSION = 2
"""2: the UNet takes one timestep per sample (`timestep [batch]`), so one call can hold several timesteps."""
MANIFEST = "manifest.json"
GRAPHS = ("text_encoder", "vae_encoder", "vae_decoder", "unet")


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


def rebuild_hint(manifest: dict[str, Any] | None, directory: Path) -> str:
    model = (manifest or {}).get("model_id", "MODEL")
    precision = (manifest or {}).get("precision", "fp32")
    return f"pnp-trt export --model {model} --precision {precision} --out {directory}"


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest, after checking format version, presence and sizes of every listed file."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise PnPError(f"{directory} has no {MANIFEST}: it is not an exported directory; "
                       f"create one with `{rebuild_hint(None, directory)}`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PnPError(f"{path} is not valid JSON; rebuild with `{rebuild_hint(None, directory)}`") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise PnPError(f"{directory} has manifest format {version}, this pnp-trt reads format {FORMAT_VERSION}; "
                       f"rebuild with `{rebuild_hint(manifest, directory)}`")
    for name, entry in manifest.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            raise PnPError(f"{file} is missing; rebuild with `{rebuild_hint(manifest, directory)}`")
        if file.stat().st_size != entry["bytes"]:
            raise PnPError(f"{file} is {file.stat().st_size} bytes, the manifest says {entry['bytes']} "
                           f"(truncated or replaced); rebuild with `{rebuild_hint(manifest, directory)}`")
    return manifest


def verify(directory: Path) -> list[str]:
    """Names of files whose sha256 differs from the manifest (empty when all match)."""
    manifest = read_manifest(directory)
    return [name for name, entry in manifest["files"].items() if sha256(Path(directory) / name) != entry["sha256"]]

