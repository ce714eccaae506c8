"""Writes that leave nothing half-done: a file or a whole directory appears complete or not at all."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import PnPError

STAGING = ".pnp-trt-staging"
RETIRED = ".pnp-trt-retired"
"""Where a results set waits while its replacement moves in (only where paths cannot be exchanged)."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, SIGTERM and SIGHUP: the signals that stop a run (cleanly: see `signals_deferred` and the CLI)."""
STALE_AFTER_S = 600
"""A staging leftover is swept once its process is gone and it has not changed for this long."""


def staging_name(kind: str, pid: int, name: str = "", suffix: str = "") -> str:
    """`<kind>.<pid>.<token>.<name><suffix>`: hidden, this process's, and provably pnp-trt's: the token is 8
    random hex digits and 8 of the SHA-256 of the rest, so a user's file that merely starts like one is never
    taken for a leftover (the name cut to 64 bytes so that it stays within the file system's 255-byte limit;
    names that are not UTF-8 kept as the OS gave them)."""
    random = secrets.token_hex(4)
    rest = f"{os.fsdecode(os.fsencode(name)[:64])}{suffix}"
    return f"{kind}.{pid}.{random}{_check(kind, pid, random, rest)}.{rest}"


def _check(kind: str, pid: int | str, random: str, rest: str) -> str:
    return hashlib.sha256(os.fsencode(f"{kind}.{pid}.{random}.{rest}")).hexdigest()[:8]


def leftover_pid(entry: Path, kind: str) -> int | None:
    """The process that made `entry`, if `staging_name(kind, ...)` named it; None for any other name."""
    parts = entry.name.split(".", 4)
    if len(parts) != 5 or f".{parts[1]}" != kind or not parts[2].isdigit() or len(parts[3]) != 16:
        return None
    random, check = parts[3][:8], parts[3][8:]
    return int(parts[2]) if check == _check(kind, parts[2], random, parts[4]) else None


def new_staging(parent: Path, name: str, directory: bool = False, suffix: str = "") -> Path:
    """A fresh staging file or directory in `parent`, after sweeping what killed runs left there."""
    sweep_stale_staging(parent)
    return _fresh(parent, STAGING, name, directory, suffix)


def _fresh(parent: Path, kind: str, name: str, directory: bool, suffix: str = "") -> Path:
    for _ in range(100):
        path = Path(parent) / staging_name(kind, os.getpid(), name, suffix)
        try:
            if directory:
                path.mkdir(mode=0o700)
            else:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise PnPError(f"cannot write in {parent} ({exc.strerror}); choose a place you can write to") from None
    raise PnPError(f"cannot make a fresh staging name in {parent}; remove the .pnp-trt-* entries there")


def sweep_stale_staging(directory: Path) -> None:
    """Restore the results sets that killed runs had moved aside, then remove their staging leftovers (SIGKILL,
    power loss): only entries `staging_name` named whose process no longer runs and that are older than
    `STALE_AFTER_S`."""
    try:
        listed = list(Path(directory).iterdir())
    except OSError:
        return
    for entry in listed:
        if leftover_pid(entry, RETIRED) is not None:
            _restore_retired(entry)
    for entry in listed:
        pid = leftover_pid(entry, STAGING)
        try:
            stale = pid is not None and not _running(pid) and time.time() - entry.lstat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if stale and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif stale:
            entry.unlink(missing_ok=True)


def _restore_retired(entry: Path) -> None:
    """A dead run's moved-aside set goes back where it was if its replacement did not get in whole (some name
    of the old set is still free): the partial new files at the others, the dead run's own, make way. A
    replacement that got in whole stays, and the old set goes."""
    from .destination import written_by_pnp_trt

    pid = leftover_pid(entry, RETIRED)
    if pid is None or _running(pid):
        return
    with contextlib.suppress(OSError):
        items = list(entry.iterdir())
        if any(not os.path.lexists(entry.parent / item.name) for item in items):
            taken = [entry.parent / i.name for i in items if os.path.lexists(entry.parent / i.name)]
            if not all(t.is_file() and not t.is_symlink() and written_by_pnp_trt(t) for t in taken):
                return  # something pnp-trt did not write took a name: leave everything as it is
            for item in items:
                item.replace(entry.parent / item.name)
        shutil.rmtree(entry)


def retire(paths: list[Path]) -> Path | None:
    """Move the existing `paths` (of one directory) aside under `RETIRED`, where the next run restores them
    as a set if this one is killed before their replacements are all in (`_restore_retired`); None if none
    exists. The caller removes the returned directory once the replacements are in."""
    present = [p for p in paths if os.path.lexists(p)]
    if not present:
        return None
    retired = _fresh(present[0].parent, RETIRED, "set", directory=True)
    for path in present:
        path.rename(retired / path.name)
    return retired


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@contextlib.contextmanager
def writing(destination: Path) -> Iterator[None]:
    """An OSError while writing `destination` (disk full, permissions, a name the file system refuses) as one
    clear line; the staged writes inside have already removed what they started."""
    try:
        yield
    except OSError as exc:
        raise PnPError(f"cannot write {destination} ({exc.strerror or exc}); free some space or choose another "
                       "place; nothing was written") from None


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    tmp = new_staging(path.parent, path.name, suffix=path.suffix)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staging_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` when the block completes, removed otherwise; `out`
    must not exist, not even as a link to nowhere (checked before any work)."""
    if os.path.lexists(out):
        raise PnPError(f"{out} already exists (perhaps as a link); choose a new directory")
    tmp = new_staging(out.parent, out.name, directory=True)
    try:
        yield tmp
        tmp.chmod(0o755)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`): a kill at any moment
    leaves each name holding one whole set. False where the system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(staging: Path, out: Path) -> None:
    """Put the finished directory `staging` at `out`. A previous set there is exchanged with it atomically (it
    then lies at `staging`, for the caller to remove); where paths cannot be exchanged it is moved aside under
    `RETIRED` (restored by the next run if this one is killed before the new set is in) and removed."""
    if not os.path.lexists(out):
        staging.rename(out)
    elif not exchange(staging, out):
        retired = retire([out])
        staging.rename(out)
        shutil.rmtree(retired)  # type: ignore[arg-type]


def ignore_stop_signals() -> None:
    """Make the system discard `STOP_SIGNALS` from now on (so they cannot cut a cleanup short, nor kill
    interpreter shutdown, where Python handlers are gone). One that arrived just before is consumed here: left
    pending, Python would raise "Signal 15 ignored due to race condition" wherever it next checks for signals."""
    while True:
        try:  # each call first runs pending handlers; the last, with all ignored, takes any left over
            for signum in (*STOP_SIGNALS, STOP_SIGNALS[0]):
                signal.signal(signum, signal.SIG_IGN)
            return
        except OSError:  # a pending signal whose handler is already SIG_IGN: consumed, as wanted
            continue


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """`STOP_SIGNALS` arriving inside the block take effect when it ends: for steps that must not be split,
    such as swapping a results directory for its replacement. Main thread only (Python delivers signals
    there); elsewhere the block just runs."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    caught: list[tuple[int, Any]] = []
    for signum in previous:
        signal.signal(signum, lambda number, frame: caught.append((number, frame)))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for number, frame in caught[:1]:
            handler = previous[signal.Signals(number)]
            if callable(handler):
                handler(number, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(number)


WRITTEN = "pnp_trt_written"
"""Attribute set on an interrupt that `committing` let through after its step completed."""


@contextlib.contextmanager
def committing(destination: Path) -> Iterator[None]:
    """The step that puts finished results in place at `destination`: Ctrl-C or SIGTERM arriving inside takes
    effect after it, and then carries `destination` (`written_before`), so nobody is told nothing was written."""
    done = False
    try:
        with signals_deferred():
            yield
            done = True
    except KeyboardInterrupt as exc:
        if done:
            setattr(exc, WRITTEN, destination)
        raise


def written_before(interrupt: BaseException) -> Path | None:
    """Where results were completely written before this interrupt took effect (None: nothing was)."""
    return getattr(interrupt, WRITTEN, None)
