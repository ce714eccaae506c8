"""Writes that leave nothing behind: staging names that fit, and leftovers of killed runs swept."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from pnp_trt.fileio import STALE_AFTER_S, atomic_write, staging_prefix
from pnp_trt.images import save_png

DEAD_PID = 2**22 + 1
"""Above Linux's largest pid: never a running process."""


def test_a_killed_runs_staging_is_swept_and_nothing_else(tmp_path: Path) -> None:
    old = (1, 1)
    dead_file = tmp_path / f".pnp-trt-staging.{DEAD_PID}.out.png.abc.png"
    dead_dir = tmp_path / f".pnp-trt-staging.{DEAD_PID}.results.xyz"
    recent = tmp_path / f".pnp-trt-staging.{DEAD_PID}.fresh.png.def.png"  # maybe another host's, still writing
    live = tmp_path / f"{staging_prefix('mine')}ghi"  # this process: alive
    foreign = tmp_path / ".hidden-by-someone-else"
    for path in (dead_file, recent, live, foreign):
        path.write_bytes(b"x")
    dead_dir.mkdir()
    (dead_dir / "0_a-cat.png").write_bytes(b"x")
    for path in (dead_file, dead_dir, live, foreign):
        os.utime(path, old)
    atomic_write(tmp_path / "new.txt", lambda tmp: tmp.write_text("done"))
    assert not dead_file.exists() and not dead_dir.exists()
    assert recent.exists() and live.exists() and foreign.exists() and STALE_AFTER_S > 0
    assert (tmp_path / "new.txt").read_text() == "done"


def test_an_output_name_at_the_file_system_limit_is_written(tmp_path: Path) -> None:
    out = tmp_path / ("a" * 246 + ".png")
    save_png(Image.new("RGB", (8, 8)), out)
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
