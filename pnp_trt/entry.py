"""The `pnp-trt` console script: stop signals are handled from its first moment (importing the CLI takes a
quarter of a second, and Ctrl-C there printed a traceback), then the CLI runs with its own handlers."""

from __future__ import annotations

import signal
import sys


def _quit(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # nothing has been written yet: the shell's code for the signal, no traceback


def nohup(signum: int) -> bool:
    """SIGHUP ignored by whoever started the process (`nohup`): it stays ignored. SIGINT and SIGTERM are handled
    whatever they inherit: a non-interactive shell starts every background job ignoring SIGINT, and a job
    stopped with it still cleans up."""
    return signum == signal.SIGHUP and signal.getsignal(signum) is signal.SIG_IGN


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if not nohup(signum):
            signal.signal(signum, _quit)
    from .cli import run_as_program

    run_as_program()
