"""The one output policy, for files and directories alike: pnp-trt replaces only what it wrote itself (a PNG
carrying its sealed record, which names the file; a directory holding only the files its
record lists, each unchanged since: the record keeps their SHA-256), never the input, a link, a device or a FIFO,
and a user's own regular file only when told to (`overwrite`). Checked before any work and again when writing."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .config import in_keywords
from .errors import PnPError
from .fileio import sweep_stale_staging
from .png_chunks import SIGNATURE, chunks, text_chunk

RECORD = "translate.json"
RECORD_CHUNK = "pnp-trt"
"""The PNG text chunk holding a single image's record (`Image.open(path).text["pnp-trt"]`)."""
SUFFIX = ".png"
RESULT_NAME = re.compile(r"([0-9]+_[a-z0-9-]+|guidance)\.png")
"""The names of the files in a results set (`results.output_names`, `translation.GUIDANCE_FILE`)."""
WRITER = "pnp-trt"
"""Every record pnp-trt writes says `"written_by": "pnp-trt"` and lists its `outputs`: a record without both (a
user's translate.json, an empty or foreign PNG text chunk) is not pnp-trt's."""


def ours(record: Any, name: str | None = None) -> bool:
    """Whether `record` (parsed JSON) is one pnp-trt wrote (listing `name` among its outputs, if given)."""
    if not isinstance(record, dict):
        return False
    outputs = record.get("outputs")
    return record.get("written_by") == WRITER and isinstance(outputs, list) \
        and all(isinstance(n, str) for n in outputs) and (name is None or name in outputs)


def seal(record: dict[str, Any], content: bytes = b"") -> str:
    """SHA-256 of a record (without its own `seal`) and the bytes it travels with: a record edited by hand, or a
    result changed around it (pixels, added chunks, bytes appended), no longer matches its seal."""
    body = json.dumps({k: v for k, v in record.items() if k != "seal"}, sort_keys=True).encode()
    return hashlib.sha256(content + b"\0" + body).hexdigest()


def sealed(record: dict[str, Any], content: bytes = b"") -> dict[str, Any]:
    return {**record, "seal": seal(record, content)}


def record_json(record: dict[str, Any]) -> str:
    """How a results set's record is written (keys sorted: the bytes follow from the content alone): a record
    re-indented or re-ordered since is not as pnp-trt wrote it, and so not its own."""
    return json.dumps(record, indent=2, sort_keys=True)


def sealed_png(png: bytes, record: dict[str, Any]) -> bytes:
    """A PNG file (without pnp-trt's chunk) with its record added as a tEXt chunk after IHDR, sealed over the
    rest of the file."""
    found = chunks(png)
    return SIGNATURE + found[0][1] + record_chunk(sealed(record, png)) + b"".join(c for _, c in found[1:])


def record_chunk(record: dict[str, Any]) -> bytes:
    """The tEXt chunk a single PNG's (sealed) record is written as: a chunk whose bytes differ (the JSON's
    spacing or key order, its checksum) is not as pnp-trt wrote it."""
    return text_chunk(RECORD_CHUNK, json.dumps(record, sort_keys=True))  # ASCII JSON: tEXt holds Latin-1


def png_record(data: bytes) -> dict[str, Any] | None:
    """The record of a PNG pnp-trt wrote, if it is still where pnp-trt put it and its seal matches the rest of
    the file; else None."""
    if not data.startswith(SIGNATURE):
        return None
    found, prefix = chunks(data), (RECORD_CHUNK + "\0").encode("latin-1")
    ours_ = [c for kind, c in found if kind == b"tEXt" and c[8:8 + len(prefix)] == prefix]
    if len(ours_) != 1 or found[1][1] is not ours_[0]:
        return None  # none, several, or moved from where pnp-trt puts it (after IHDR): not as it wrote it
    rest = SIGNATURE + b"".join(c for _, c in found if c is not ours_[0])
    try:
        record = json.loads(ours_[0][8 + len(prefix):-4].decode("latin-1"))
    except ValueError:
        return None
    if not isinstance(record, dict) or record_chunk(record) != ours_[0]:
        return None
    return record if record.get("seal") == seal(record, rest) else None


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (a results set records its files' digests: an edited file is not ours)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


API_PHRASES = (("beside --out", "beside it"), ("several --prompt", "several prompts"),
               ("one --prompt", "one prompt"), ("choose another --out", "choose another path"))
"""The CLI's phrases in these refusals that an API caller reads without a flag."""


def api_wording(message: str, label: str) -> str:
    """A destination refusal as `Translation.save`/`save_image` callers read it: their argument, not `--out`."""
    for phrase, words in API_PHRASES:
        message = message.replace(phrase, words)
    return in_keywords(message, {"out": label, "overwrite": "overwrite=True"})


@contextlib.contextmanager
def api_words(label: str) -> Iterator[None]:
    """Refusals raised inside in `api_wording`."""
    try:
        yield
    except PnPError as exc:
        raise PnPError(api_wording(str(exc), label)) from None


def check_destination(out: Path | str, several: bool, overwrite: bool = False, inputs: Iterable[Path | str] = (),
                      companions: Iterable[Path] = ()) -> None:
    """Fail, in one line, before anything is written if the results may not go to `out` (a directory with
    `several`, else one PNG file, with `companions` written beside it), given the `inputs` read. `out` as
    typed (str) keeps a final `/`, which names a directory."""
    if not str(out):
        raise PnPError("--out is empty; give the output .png file (one --prompt) or a directory (several)")
    if not several and str(out).endswith(("/", os.sep)):
        raise PnPError(f"--out {out} ends in /, naming a directory; with one --prompt give the output .png file")
    if Path(out).name in ("", ".."):  # ., ./, .., / (no resolving: a link loop is judged below)
        raise PnPError(f"--out {out} names a directory by a path with no name of its own (., .., /); "
                       + ("results replace their directory as a whole: give a new one, e.g. --out results" if several
                          else "with one --prompt give the output .png file"))
    out = Path(out)
    parent = out.parent  # Path("o.png").parent is Path(".")
    if not parent.is_dir():
        raise PnPError(f"cannot write {out}: {parent} {_not_a_directory(parent)}")
    sweep_stale_staging(parent)  # a killed run's results set is restored before anything is judged
    read = [Path(p) for p in inputs]
    if several:
        _check_directory(out, read)
    else:
        _check_file(out, overwrite, read, f"--out {out}")
        for path in companions:  # --overwrite is about --out alone: a user's file here is never replaced
            _check_file(path, False, read, f"the generated guidance's file {path} (beside --out)")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise PnPError(f"cannot write to {parent} ({exc.strerror}); choose another --out") from None


def _check_file(path: Path, overwrite: bool, inputs: list[Path], label: str) -> None:
    _check_name(path)
    kind = _kind(path)
    if kind not in (None, "file", "directory"):
        raise PnPError(f"{label} is {kind}; pnp-trt never replaces one: give the path of a new .png file")
    if kind == "directory":
        raise PnPError(f"{label} is a directory; with one --prompt it is the output image file")
    if kind == "file" and any(same_file(path, p) for p in inputs):
        raise PnPError(f"{label} is the guidance image; write the result to another file")
    if path.name.lower() == SUFFIX:
        raise PnPError(f"{label} has no name before {path.name}; give a file name such as out.png")
    if path.suffix.lower() != SUFFIX:
        raise PnPError(f"{label}: the result is a PNG image; give a name ending in .png")
    if kind == "file" and not overwrite and not written_by_pnp_trt(path):
        raise PnPError(f"{label} exists and was not written by pnp-trt; choose another name"
                       + (", or pass --overwrite to replace it" if label.startswith("--out") else ""))


def _check_directory(out: Path, inputs: list[Path]) -> None:
    _check_name(out)
    kind = _kind(out)
    if kind is None:
        return
    if kind == "file":
        raise PnPError(f"--out {out} is a file; with several --prompt it must be a directory")
    if kind != "directory":
        raise PnPError(f"--out {out} is {kind}; pnp-trt never replaces one: give the path of a new directory")
    if any(p.resolve().is_relative_to(out.resolve()) for p in inputs):
        raise PnPError(f"--out {out} holds the guidance image; write the results to another directory")
    previous, distrusted = _previous_set(out)
    ours = {name for name in previous if _kind(out / name) == "file"}  # a directory or link: not ours
    foreign = sorted(set(p.name for p in out.iterdir()) - ours)
    if foreign:
        raise PnPError(f"--out {out} holds files pnp-trt did not write, or that changed since it wrote them "
                       f"({distrusted or ', '.join(foreign[:3])}); choose a new or empty directory")


def _not_a_directory(path: Path) -> str:
    """Why `path`, which is not a directory one can write in, is not one."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a loop of symbolic links"
        return "is a symbolic link to nothing" if path.is_symlink() else "does not exist"
    return "is a file, not a directory"


def _kind(path: Path) -> str | None:
    """What is at `path` without following a link: None (nothing), 'file', 'directory' or what else it is."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PnPError(f"cannot use --out {path} ({exc.strerror}); choose another path") from None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def _check_name(path: Path) -> None:
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(path.name)) > limit:
        raise PnPError(f"--out name {path.name[:40]}… is {len(os.fsencode(path.name))} bytes; this file system "
                       f"allows {limit}: choose a shorter name")


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def written_by_pnp_trt(path: Path) -> bool:
    """A PNG whose sealed pnp-trt record names this very file (a result, or a guidance beside one), unchanged
    since: its pixels, chunks, trailing bytes and the record itself as pnp-trt wrote them."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RESULT_BYTES + 1)
    except OSError:
        return False
    return len(data) <= MAX_RESULT_BYTES and ours(png_record(data), path.name)


MAX_RESULT_BYTES = 1 << 30
"""A PNG pnp-trt wrote is smaller than this (its pixel limit); a larger file is not read to find out."""


def previous_results(out: Path) -> list[str]:
    """The files a previous run recorded in `out` that are still as it wrote them (its PNGs, by their recorded
    SHA-256, and the record itself), if it left a record of pnp-trt's."""
    return _previous_set(out)[0]


def check_cache_home(cache_dir: Path | str, engines: Path | str | None) -> None:
    """A disk cache keeps a directory of its own, for every surface: not inside the exported directory nor an
    earlier run's results (each would then hold files it did not write, and its owner would refuse them)."""
    if engines is not None and Path(cache_dir).resolve().is_relative_to(Path(engines).resolve()):
        raise PnPError(f"--cache-dir {cache_dir} is inside the exported directory {engines}; keep the cache in a "
                       "directory of its own")
    if (results := enclosing_results(Path(cache_dir))) is not None:
        raise PnPError(f"--cache-dir {cache_dir} is inside the results of an earlier run ({results}); keep the cache "
                       "in a directory of its own")


def enclosing_results(path: Path) -> Path | None:
    """The results directory of an earlier run that `path` is inside (or is), if any: a cache made there would
    make that set one pnp-trt no longer trusts, and refuses to replace."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a link loop: judged where the cache is opened
        return None
    for directory in (resolved, *resolved.parents):
        if previous_results(directory):
            return directory
    return None


def _previous_set(out: Path) -> tuple[list[str], str]:
    """`previous_results`, and why there are none where `out` holds a record pnp-trt will not trust ('' else)."""
    try:
        text = (out / RECORD).read_bytes().decode("utf-8")  # bytes as they are: CRLF is not pnp-trt's LF
    except FileNotFoundError:
        return [], ""
    except (OSError, ValueError):
        return [], f"its {RECORD} is not readable UTF-8 text"
    try:
        record = json.loads(text)
        digests = record["files"]
    except (ValueError, KeyError, TypeError):
        return [], f"its {RECORD} is not a pnp-trt record"
    if not ours(record) or not isinstance(digests, dict):
        return [], f"its {RECORD} was not written by pnp-trt"
    if record.get("seal") != seal(record) or text != record_json(record):
        return [], f"its {RECORD} was edited since pnp-trt wrote it (a key added, a file listed, even re-indented)"
    if record.get("directory") != out.name:  # a set copied or renamed, as a single PNG names its own file
        return [], f"its results were written to a directory named {str(record.get('directory'))[:60]!r} and " \
                   "copied or renamed here"
    unchanged = []
    for name in record["outputs"]:
        if not RESULT_NAME.fullmatch(name):
            continue  # pnp-trt names its files NN_slug.png and guidance.png: anything else is not its own
        path = out / name
        try:
            if path.parent == out and path.is_file() and not path.is_symlink() \
                    and digests.get(name) == file_digest(path):
                unchanged.append(name)
        except OSError:
            continue
    return [RECORD, *unchanged], ""
