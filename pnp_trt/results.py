"""Where a translation's results go: one PNG carrying its record (one prompt), or a directory of one PNG per
prompt plus the `translate.json` record, written all or nothing and replacing a previous run's results as one
set."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image

from .destination import (
    RECORD,
    WRITER,
    check_destination,
    file_digest,
    record_json,
    same_file,
    sealed,
    sealed_png,
    written_by_pnp_trt,
)
from .fileio import committing, new_staging, retire, swap_in
from .images import png_bytes


def output_names(prompts: Sequence[str]) -> list[str]:
    """NN_slug.png, zero-padded so they sort in prompt order."""
    width = len(str(len(prompts) - 1))
    return [f"{i:0{width}d}_{_slug(p)}.png" for i, p in enumerate(prompts)]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "prompt"


def save_directory(out: Path, prompts: Sequence[str], images: Sequence[Image.Image], record: dict[str, Any],
                   extra: Mapping[str, Image.Image] | None = None, inputs: Sequence[Path | str] = ()) -> list[Path]:
    """One PNG per prompt (plus `extra` PNGs by file name) and the record, built beside `out` and swapped in
    whole (a previous run's results there are replaced as one set, never mixed with the new ones)."""
    out = Path(out)
    check_destination(out, several=True, inputs=inputs)
    extra = dict(extra or {})
    names = output_names(prompts)
    staging = new_staging(out.parent, out.name, directory=True)
    try:
        for name, image in [*zip(names, images, strict=True), *extra.items()]:
            image.save(staging / name, format="PNG")
        files = [*names, *extra]
        digests = {name: file_digest(staging / name) for name in files}  # an edited file is then not ours
        (staging / RECORD).write_bytes(record_json(sealed({**record, "written_by": WRITER, "outputs": files,
                                                           "directory": out.name, "files": digests})).encode())
        staging.chmod(0o755)
        with committing(out):  # the previous set (at `staging` after an exchange) is removed inside too: a stop
            swap_in(staging, out)  # signal there cut the removal short and was told "nothing was written"
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a set that never went in
    return [out / n for n in names]


def guidance_beside(out: Path) -> Path:
    """Where a single result's decoded generated guidance goes: NAME.guidance.png."""
    return out.with_name(f"{out.stem}.guidance.png")


def save_file(typed: Path | str, image: Image.Image, record: dict[str, Any], guidance: Image.Image | None = None,
              overwrite: bool = False, inputs: Sequence[Path | str] = ()) -> Path:
    """One PNG at `typed` carrying the record in its `RECORD_CHUNK` text chunk, and a decoded generated guidance
    beside it as NAME.guidance.png: both encoded under staging names first, then moved into place together
    (an earlier run's files there stay as they were if anything fails before). `typed` as given: a str keeps
    a final `/`, which names a directory and is refused."""
    out = Path(typed)
    companions = [guidance_beside(out)] if guidance is not None else []
    check_destination(typed, several=False, overwrite=overwrite, inputs=inputs, companions=companions)
    pictures: dict[Path, tuple[Image.Image, dict[str, Any]]] = {}
    if guidance is not None:
        beside = guidance_beside(out).name
        pictures[guidance_beside(out)] = (guidance, {"written_by": WRITER, "guidance_of": out.name,
                                                     "outputs": [beside]})
    names = [out.name, *(path.name for path in pictures)]
    pictures[out] = (image, {**record, "written_by": WRITER, "outputs": names})
    # an earlier run's guidance beside `out` belongs to the result replaced: it goes with it, as a pair, unless
    # this run reads it (corpus 13: given as the guidance image, it was deleted)
    paired = guidance_beside(out)
    stale = [paired] if guidance is None and written_by_pnp_trt(paired) \
        and not any(same_file(paired, Path(p)) for p in inputs) else []
    staged: dict[Path, Path] = {}
    try:
        for path, (picture, chunk) in pictures.items():
            staged[path] = new_staging(path.parent, path.name, suffix=".png")
            staged[path].write_bytes(sealed_png(png_bytes(picture), chunk))
        with committing(out):  # the earlier pair moved aside first: a kill midway gets it back (`retire`)
            retired = retire(list(staged) + stale) if len(staged) > 1 or stale else None
            for path, tmp in staged.items():  # the image, carrying the record, last
                tmp.chmod(0o644)
                os.replace(tmp, path)
            if retired is not None:
                shutil.rmtree(retired, ignore_errors=True)
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
