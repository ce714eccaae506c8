"""Where a translation's results go: one PNG carrying its record (one prompt), or a directory of one PNG per
prompt plus the `translate.json` record, written all or nothing and replacing a previous run's results as one
set."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import PnPError
from .fileio import committing, new_staging
from .images import write_png

RECORD = "translate.json"
RECORD_CHUNK = "pnp-trt"
"""The PNG text chunk holding a single image's record (`Image.open(path).text["pnp-trt"]`)."""


def check_destination(out: Path, several: bool) -> None:
    """Fail before any work if the results cannot be written there, or would mix with files we did not write."""
    out = Path(out)
    parent = out.parent if out.parent != Path("") else Path(".")
    if not parent.is_dir():
        raise PnPError(f"cannot write {out}: directory {parent} does not exist")
    if several and out.exists() and not out.is_dir():
        raise PnPError(f"--out {out} is a file; with several --prompt it must be a directory")
    if not several and out.is_dir():
        raise PnPError(f"--out {out} is a directory; with one --prompt it is the output image file")
    if several and out.is_dir():
        foreign = sorted(set(p.name for p in out.iterdir()) - set(_previous_results(out)))
        if foreign:
            raise PnPError(f"--out {out} holds files pnp-trt did not write ({', '.join(foreign[:3])}); "
                           "choose a new or empty directory")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError:
        raise PnPError(f"cannot write to {parent}: permission denied; choose another --out") from None


def _previous_results(out: Path) -> list[str]:
    """The files a previous run recorded in `out` (its PNGs and the record), if it left a readable record."""
    try:
        outputs = json.loads((out / RECORD).read_text())["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [RECORD, *outputs] if isinstance(outputs, list) else []


def output_names(prompts: Sequence[str]) -> list[str]:
    """NN_slug.png, zero-padded so they sort in prompt order."""
    width = len(str(len(prompts) - 1))
    return [f"{i:0{width}d}_{_slug(p)}.png" for i, p in enumerate(prompts)]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "prompt"


def save_directory(out: Path, prompts: Sequence[str], images: Sequence[Image.Image], record: dict[str, Any],
                   extra: Mapping[str, Image.Image] | None = None) -> list[Path]:
    """One PNG per prompt (plus `extra` PNGs by file name) and the record, built beside `out` and swapped in
    whole (a previous run's results there are replaced as one set, never mixed with the new ones)."""
    out = Path(out)
    check_destination(out, several=True)
    extra = dict(extra or {})
    names = output_names(prompts)
    staging = new_staging(out.parent, out.name, directory=True)
    retired = new_staging(out.parent, f"{out.name}.old", directory=True)
    try:
        for name, image in [*zip(names, images, strict=True), *extra.items()]:
            image.save(staging / name, format="PNG")
        (staging / RECORD).write_text(json.dumps({**record, "outputs": [*names, *extra]}, indent=2))
        staging.chmod(0o755)
        with committing(out):  # the old set aside, the new one in, the old one gone: never neither
            if out.exists():
                out.rename(retired / out.name)
            staging.rename(out)
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    return [out / n for n in names]


def save_file(out: Path, image: Image.Image, record: dict[str, Any], guidance: Image.Image | None = None) -> Path:
    """One PNG at `out` carrying the record in its `RECORD_CHUNK` text chunk, and a decoded generated guidance
    beside it as NAME.guidance.png: both encoded under staging names first, then moved into place together
    (an earlier run's files there stay as they were if anything fails before)."""
    out = Path(out)
    check_destination(out, several=False)
    pictures: dict[Path, tuple[Image.Image, dict[str, str]]] = {}
    if guidance is not None:
        pictures[out.with_name(f"{out.stem}.guidance.png")] = (guidance, {})
    names = [out.name, *(path.name for path in pictures)]
    pictures[out] = (image, {RECORD_CHUNK: json.dumps({**record, "outputs": names})})
    staged: dict[Path, Path] = {}
    try:
        for path, (picture, text) in pictures.items():
            staged[path] = new_staging(path.parent, path.name, suffix=".png")
            write_png(picture, staged[path], text)
        with committing(out):
            for path, tmp in staged.items():  # the image, carrying the record, last
                tmp.chmod(0o644)
                os.replace(tmp, path)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return out


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on (those installed)."""
    found = {}
    for package in ("pnp-trt", "torch", "diffusers", "transformers", "onnxruntime", "onnx", "tensorrt"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found
