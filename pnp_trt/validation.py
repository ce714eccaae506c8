"""One validation layer: every setting, config field and record pnp-trt reads becomes a typed, bounded value
here or is refused in one line naming the field, what it must be and what it was. Settings (CLI, API, HTTP),
scheduler configs, manifests and tokenizer records all go through these few functions."""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PnPError

NUMBER_TEXT = {int: re.compile(r"[+-]?[0-9]+"),
               float: re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity|nan)",
                                 re.IGNORECASE)}
"""How a number is written in a flag or a form field: ASCII digits (int() and float() also take "1_0" and
non-ASCII digits)."""


NUMBER_PADDING = " \t\r\n"
"""What may surround a number's digits (ASCII only: a no-break or ideographic space is not padding)."""


def number_text(kind: type, text: Any) -> int | float:
    """A flag's or form field's text as an int or float, by `NUMBER_TEXT`; ValueError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return kind(text)  # a default, already a number
    digits = text.strip(NUMBER_PADDING) if isinstance(text, str) else None
    if digits is None or not NUMBER_TEXT[kind].fullmatch(digits):
        raise ValueError(text)
    return kind(digits)


def clipped(value: Any, width: int = 40) -> str:
    """`repr(value)` cut to `width` characters, with "…" where it was cut (a cut number must not read whole)."""
    text = repr(value)
    return text[:width] + "…" if len(text) > width else text


def _shown(value: Any) -> str:
    return f"{clipped(value)} ({type(value).__name__})"


def integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """A whole number (not a bool, float or string) within [low, high]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise PnPError(f"{name} must be a whole number, got {_shown(value)}")
    return int(_bounded(name, int(value), low, high))


def _num(value: float) -> str:
    """Enough digits that a value just past a bound does not read as the bound (1000.0001, not 1000)."""
    return f"{value:.12g}" if isinstance(value, float) else str(value)


def number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite real number (int or float, not a bool or string) within [low, high]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PnPError(f"{name} must be a number, got {_shown(value)}")
    if not math.isfinite(float(value)):
        raise PnPError(f"{name} must be a finite number, got {value}")
    return float(_bounded(name, float(value), low, high))


def _bounded(name: str, value: float, low: float | None, high: float | None) -> float:
    if low is not None and high is not None and not low <= value <= high:
        raise PnPError(f"{name} must be between {_num(low)} and {_num(high)}, got {_num(value)}")
    if low is not None and value < low:
        raise PnPError(f"{name} must be at least {_num(low)}, got {_num(value)}")
    if high is not None and value > high:
        raise PnPError(f"{name} must be at most {_num(high)}, got {_num(value)}")
    return value


def boolean(name: str, value: Any) -> bool:
    """true or false itself (a string "false" is not false)."""
    if not isinstance(value, (bool, np.bool_)):
        raise PnPError(f"{name} must be true or false, got {_shown(value)}")
    return bool(value)


def path(name: str, value: Any) -> Path:
    """A path given as str or Path: not empty (that would mean the current directory) and without NUL bytes
    (which no file system allows: Python raises a bare ValueError)."""
    if isinstance(value, os.PathLike) and not isinstance(value, Path):
        value = os.fspath(value)
    if not isinstance(value, (str, Path)):
        raise PnPError(f"{name} must be a path (str, Path or os.PathLike of text), got {_shown(value)}")
    if not str(value):
        raise PnPError(f"{name} is empty; give a path")
    if "\x00" in str(value):
        raise PnPError(f"{name} {str(value)[:60]!r} contains a NUL byte, which no file name can hold")
    return Path(value)


MAX_TEXT_CHARS = 2000
"""The longest prompt any surface takes: text encoders read 77 tokens, and far longer text is a mistake (or a
client flooding the server), not a description."""


def text(name: str, value: Any, non_blank: bool = False, limit: int | None = MAX_TEXT_CHARS) -> str:
    """A string of valid Unicode (argv bytes that are not UTF-8 are refused here) of at most `limit` characters,
    optionally not blank."""
    if not isinstance(value, str):
        raise PnPError(f"{name} must be text, got {_shown(value)}")
    if limit is not None and len(value) > limit:
        raise PnPError(f"{name} is {len(value)} characters, over the limit of {limit} (the text encoder reads "
                       "only its first 77 tokens); shorten it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PnPError(f"{name} is not valid UTF-8 text; check the terminal's or file's encoding") from None
    if "\x00" in value:
        raise PnPError(f"{name} contains a NUL character; remove it")
    if non_blank and all(_invisible(c) for c in value):
        raise PnPError(f"{name} must not be empty or only spaces, control or invisible characters")
    return value


FILLERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e")
"""Characters that draw nothing yet are letters or symbols to Unicode: Hangul fillers, the blank Braille pattern,
the Mongolian vowel separator."""


def _invisible(char: str) -> bool:
    """Draws nothing on its own: a control, format, separator or space character, a combining mark (a variation
    selector, say) or a filler."""
    return unicodedata.category(char)[0] in "CZ" or unicodedata.category(char) in ("Mn", "Me") or char in FILLERS


def one_of(name: str, value: Any, options: Sequence[Any]) -> Any:
    if value not in options:
        raise PnPError(f"{name} must be one of {', '.join(map(repr, options))}, got {_shown(value)}")
    return value


def prompts(value: Any) -> list[str]:
    """Target prompts: one string, or a non-empty list of non-blank strings (one rule for every surface)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise PnPError(f"give at least one target prompt (text, or a list of texts), got {_shown(value)}")
    return [text(f"prompt {i + 1}", item, non_blank=True) for i, item in enumerate(items)]
