"""Writes that leave nothing behind: staging names that fit, and leftovers of killed runs swept."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from pnp_trt.fileio import RETIRED, STAGING, STALE_AFTER_S, atomic_write, staging_name, written_before
from pnp_trt.images import write_png

DEAD_PID = 2**22 + 1
"""Above Linux's largest pid: never a running process."""


def test_a_killed_runs_staging_is_swept_and_nothing_else(tmp_path: Path) -> None:
    old = (1, 1)
    dead_file = tmp_path / staging_name(STAGING, DEAD_PID, "out.png", ".png")
    dead_dir = tmp_path / staging_name(STAGING, DEAD_PID, "results")
    recent = tmp_path / staging_name(STAGING, DEAD_PID, "fresh.png", ".png")  # maybe another host's, still writing
    live = tmp_path / staging_name(STAGING, os.getpid(), "mine")  # this process: alive
    foreign = tmp_path / ".hidden-by-someone-else"
    lookalikes = [tmp_path / f"{STAGING}.999999.notes.txt", tmp_path / f"{STAGING}.{DEAD_PID}.abcdefgh12345678.x",
                  tmp_path / f"{RETIRED}.999997.mine"]  # corpus 12: a user's files named like ours were deleted
    for path in (dead_file, recent, live, foreign, *lookalikes[:2]):
        path.write_bytes(b"x")
    dead_dir.mkdir()
    (dead_dir / "0_a-cat.png").write_bytes(b"x")
    lookalikes[2].mkdir()
    (lookalikes[2] / "data.txt").write_text("a user's")
    for path in (dead_file, dead_dir, live, foreign, *lookalikes):
        os.utime(path, old)
    atomic_write(tmp_path / "new.txt", lambda tmp: tmp.write_text("done"))
    assert not dead_file.exists() and not dead_dir.exists()
    assert recent.exists() and live.exists() and foreign.exists() and STALE_AFTER_S > 0
    assert all(path.exists() for path in lookalikes) and (lookalikes[2] / "data.txt").read_text() == "a user's"
    assert (tmp_path / "new.txt").read_text() == "done"


def test_an_output_name_at_the_file_system_limit_is_written(tmp_path: Path) -> None:
    out = tmp_path / ("a" * 246 + ".png")
    atomic_write(out, lambda tmp: write_png(Image.new("RGB", (8, 8)), tmp))
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_an_interrupt_while_results_are_swapped_in_leaves_one_whole_set(tmp_path: Path, monkeypatch) -> None:
    """Where paths cannot be exchanged in one step: Ctrl-C arriving between moving the old results aside and the
    new ones in (simulated: sent by the first rename) takes effect after the swap: the new set is in place."""
    import signal

    import pytest

    import pnp_trt.fileio as fileio
    from pnp_trt.results import save_directory

    image = Image.new("RGB", (8, 8))
    out = tmp_path / "out"
    save_directory(out, ["old"], [image], {})
    real_rename, calls = Path.rename, []

    def rename_then_interrupt(self: Path, target: Path) -> Path:
        moved = real_rename(self, target)
        calls.append(target)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return moved

    monkeypatch.setattr(Path, "rename", rename_then_interrupt)
    monkeypatch.setattr(fileio, "exchange", lambda a, b: False)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIG_IGN
    try:
        with pytest.raises(KeyboardInterrupt) as interrupt:
            save_directory(out, ["new"], [image], {})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(calls) == 2 and sorted(p.name for p in out.iterdir()) == ["0_new.png", "translate.json"]
    assert written_before(interrupt.value) == out  # so the CLI does not say "nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_value_cut_short_in_a_message_says_so() -> None:
    """Corpus 15 (E53): a 31-digit model_max_length was shown cut to 24 digits with nothing to say it was cut."""
    from pnp_trt.validation import clipped

    assert clipped(1000000000000000019884624838656, 24) == "100000000000000001988462…"
    assert clipped(77, 24) == "77" and clipped("x" * 40) == repr("x" * 40)[:40] + "…"
