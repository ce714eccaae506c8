"""The demo model: the SD 2.1 topology at small widths, trained here on a synthetic world of coloured shapes
(`world`), so PnP's effect shows offline; `judge` scores edits of that world against their known ideal."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import PnPError
from ..fileio import staging_directory

SETTINGS = {"negative_prompt": ""}
"""What the demo model is run with besides PnP's defaults: its captions are its whole vocabulary, so its negative
prompt is the empty one it learned classifier-free guidance with (the paper's "ugly, blurry, …" are unknown
words to it)."""
MODEL = Path(__file__).parent / "model"
"""The trained weights, shipped in the package (a diffusers directory; `training.json` says how they were made)."""


def make_demo_model(out: Path) -> bool:
    """Copy the demo model to `out` as a diffusers directory, whole or not at all. `out` must not exist, or hold
    this very model byte for byte: then it is reused (returns False)."""
    from ..manifest import file_entries

    if not (MODEL / "model_index.json").is_file():
        raise PnPError(f"the demo model's weights are missing from this installation ({MODEL}); reinstall pnp-trt")
    out = Path(out)
    if out.is_dir() and not out.is_symlink() and file_entries(out) == file_entries(MODEL):
        return False
    if out.exists() or out.is_symlink():
        raise PnPError(f"{out} already exists and is not the demo model; choose a new directory")
    if not out.parent.is_dir():
        raise PnPError(f"cannot write {out}: directory {out.parent} does not exist")
    with staging_directory(out) as tmp:
        shutil.copytree(MODEL, tmp, dirs_exist_ok=True)
    return True
