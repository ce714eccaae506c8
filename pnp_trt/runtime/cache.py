"""Capture once, translate many: the source branch (start latent + captured features) keyed by everything
it depends on — never by the target prompt, negative prompt or guidance scale.

In memory: an LRU bounded by bytes. On disk (optional): one safetensors file per source, written
atomically, its checksum verified on read; a corrupt or foreign file is ignored and rebuilt, never trusted.
The directory is bounded by bytes too: least recently used entries (by modification time, refreshed on
each hit) go first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import validation
from ..config import DEFAULT_CACHE_BYTES, DEFAULT_DISK_CACHE_BYTES, TranslateConfig
from ..contract import array_precision
from ..errors import PnPError
from ..fileio import atomic_write
from .backend import Array, Backend
from .sampler import Source

DISK_FORMAT = "pnp-trt-source-1"


def source_key(identity: str, config: TranslateConfig, size: tuple[int, int], image: np.ndarray | None,
               source_prompt: str | None, injection: str = "sd/pnp") -> str:
    """sha256 of what the source branch depends on: guidance content, model, where it injects (family/preset),
    size, schedule, τ_f/τ_A."""
    guidance: dict[str, Any]
    if image is not None:
        guidance = {"image_sha256": hashlib.sha256(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()}
    else:
        guidance = {"source_prompt": source_prompt, "seed": config.seed,
                    "source_guidance_scale": config.source_guidance_scale}
    fields = {"model": identity, "injection": injection, "size": list(size), "steps": config.steps,
              "inversion_steps": config.effective_inversion_steps, "inversion_prompt": config.inversion_prompt,
              "feature_injection": config.feature_injection, "attention_injection": config.attention_injection,
              **guidance}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def array_bytes(array: Array) -> int:
    return int(array.nbytes) if hasattr(array, "nbytes") else int(array.numel() * array.element_size())


def source_bytes(source: Source) -> int:
    return array_bytes(source.start) + sum(array_bytes(a) for step in source.captured for a in step.values())


class SourceCache:
    """Thread-safe LRU of sources bounded by `budget_bytes` (0: none in memory; the newest source is kept even
    when it alone is larger, so capture-once holds for a big source too), optionally backed by a directory."""

    def __init__(self, budget_bytes: int = DEFAULT_CACHE_BYTES, directory: Path | str | None = None,
                 disk_budget_bytes: int = DEFAULT_DISK_CACHE_BYTES):
        self.budget_bytes = validation.integer("cache_bytes", budget_bytes, 0, 2**50)
        self.disk_budget_bytes = validation.integer("cache_dir_bytes", disk_budget_bytes, 0, 2**60)
        self.directory = validation.path("cache_dir", directory) if directory is not None else None
        self._entries: OrderedDict[str, Source] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}
        self._warned = False
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self._disk_failed(exc)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, backend: Backend, fits: Callable[[Source], bool] = lambda source: True) -> Source | None:
        """The source stored under `key`; one read from disk must also `fit` (the shapes and steps its user
        expects), else it is removed: a cache entry is data, never trusted beyond its checks."""
        with self._lock:
            source = self._entries.get(key)
            if source is not None:
                self._entries.move_to_end(key)
                return source
        if self.directory is None:
            return None
        source = read_source(self.directory, key, backend)
        if source is None:
            return None
        backend.synchronize()  # uploaded before any other thread's stream reads it
        if not fits(source):
            (self.directory / f"{key}.safetensors").unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):  # recently used: the last to be trimmed
            os.utime(self.directory / f"{key}.safetensors")
        self._remember(key, source)
        return source

    def get_or_build(self, key: str, backend: Backend, build: Callable[[], Source],
                     fits: Callable[[Source], bool] = lambda source: True) -> tuple[Source, bool]:
        """The cached source and True, or `build()`'s result (then cached) and False. Concurrent misses on
        one key build it once: the others wait for that build and then hit."""
        source = self.get(key, backend, fits)
        if source is not None:
            return source, True
        with self._lock:
            building = self._building.setdefault(key, threading.Lock())
        try:
            with building:
                source = self.get(key, backend, fits)
                if source is not None:
                    return source, True
                source = build()
                self.put(key, source, backend)
                return source, False
        finally:
            with self._lock:
                self._building.pop(key, None)

    def put(self, key: str, source: Source, backend: Backend) -> None:
        """Keep `source` in memory, and on disk when a directory is set. The disk is best effort: a cache
        that cannot be written (read-only, full, a directory in the way) warns once and is then skipped,
        never costing the translation it was meant to speed up."""
        self._remember(key, source)
        if self.directory is not None:
            fits = source_bytes(source) <= self.disk_budget_bytes  # else never kept there (as in memory)
            try:
                if fits:
                    write_source(self.directory, key, source, backend)
                trim_directory(self.directory, self.disk_budget_bytes, keep=key if fits else None)
            except UnreadableEntry as exc:  # this key's place is taken: the cache goes on for the others
                warnings.warn(f"source cache {self.directory}: {exc}", RuntimeWarning, stacklevel=2)
            except Exception as exc:  # OSError, or safetensors' own error types on a full disk
                self._disk_failed(exc)

    def _disk_failed(self, exc: Exception) -> None:
        if not self._warned and self.directory is not None and os.path.lexists(self.directory) \
                and not self.directory.is_dir():
            warnings.warn(f"source cache {self.directory} is not a directory (a file, FIFO, device or link); going on "
                          "without it: give --cache-dir a directory of its own", RuntimeWarning, stacklevel=3)
        elif not self._warned:
            if isinstance(exc, PnPError):
                detail = str(exc)
            elif isinstance(exc, OSError) and exc.strerror:
                detail = exc.strerror
            else:
                detail = f"{type(exc).__name__}: {str(exc)[:120]}"
            warnings.warn(f"source cache {self.directory} cannot be written ({detail}); going on without it: give "
                          "--cache-dir a directory that can be written", RuntimeWarning, stacklevel=3)
        self._warned, self.directory = True, None

    def _remember(self, key: str, source: Source) -> None:
        size = source_bytes(source)
        with self._lock:
            if key in self._entries:
                self._bytes -= source_bytes(self._entries.pop(key))
            if self.budget_bytes == 0:
                return  # the memory cache is off
            self._entries[key] = source
            self._bytes += size
            while self._bytes > self.budget_bytes and len(self._entries) > 1:  # the newest stays, even alone over
                _, evicted = self._entries.popitem(last=False)  # the budget (SDXL at 1024²: 4 GiB a source)
                self._bytes -= source_bytes(evicted)


def trim_directory(directory: Path, budget_bytes: int, keep: str | None) -> None:
    """Delete the least recently used entries until the directory's sources fit `budget_bytes` (never `keep`,
    the one just written; a budget lowered since earlier runs applies to theirs too); other files there are not
    ours and stay."""
    entries = []
    for path in directory.glob("*.safetensors"):
        if len(path.stem) == 64 and path.stem != keep and is_entry(path):
            with contextlib.suppress(OSError):
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
    kept = directory / f"{keep}.safetensors" if keep else None
    total = sum(size for _, size, _ in entries) + (kept.stat().st_size if kept and kept.exists() else 0)
    for _, size, path in sorted(entries):
        if total <= budget_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size


def is_entry(path: Path) -> bool:
    """A file this cache wrote (perhaps since copied or renamed): its safetensors header says so (only the header
    is read). A user's file of the same shape of name is not one: it is never read, replaced or deleted."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
    except Exception:  # not a safetensors file at all
        return False
    return metadata.get("format") == DISK_FORMAT


def _host(backend: Backend, array: Array) -> np.ndarray:
    host = backend.to_numpy(array)
    return host.astype(np.float16) if array_precision(array) == "float16" else host


def _checksum(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensors[name]).tobytes())
    return digest.hexdigest()


class UnreadableEntry(PnPError):
    """A file holds the name a source would be written under, and it is not an entry this cache wrote."""


def write_source(directory: Path, key: str, source: Source, backend: Backend) -> None:
    from safetensors.numpy import save_file

    tensors = {"start": _host(backend, source.start)}
    for step, captured in enumerate(source.captured):
        tensors.update({f"step{step}.{name}": _host(backend, a) for name, a in captured.items()})
    if source.guidance is not None:
        tensors["guidance"] = _host(backend, source.guidance)
    metadata = {"format": DISK_FORMAT, "key": key, "steps": str(len(source.captured)),
                "sha256": _checksum(tensors)}
    path = directory / f"{key}.safetensors"
    if os.path.lexists(path) and not (path.is_file() and not path.is_symlink() and is_entry(path)):
        raise UnreadableEntry(f"{key[:16]}….safetensors in it is not an entry this cache can read (damaged, or "
                              "not pnp-trt's); left as it is, and this source not cached: delete it to let it be "
                              "cached again")
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata))


def read_source(directory: Path, key: str, backend: Backend) -> Source | None:
    """The stored source, or None: when missing or not an entry of this cache (left alone), or when an entry
    is corrupt, not a well-formed source (`stored_steps`) or not in the precision this backend stores (then it
    is removed)."""
    from safetensors import safe_open

    path = directory / f"{key}.safetensors"
    if not path.is_file() or path.is_symlink() or not is_entry(path):
        return None  # absent, or a file this cache did not write: never read as a source, never deleted
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        valid = (metadata.get("format") == DISK_FORMAT and metadata.get("key") == key
                 and metadata.get("sha256") == _checksum(tensors))
        written = _host(backend, backend.asarray(np.zeros(1, np.float32))).dtype  # what this backend stores
        steps = stored_steps(tensors, metadata) if valid and all(a.dtype == written for a in tensors.values()) \
            else None
    except Exception:  # any unreadable file is treated as absent and rebuilt
        steps = None
    if steps is None:
        path.unlink(missing_ok=True)
        return None
    captured = [{name.split(".", 1)[1]: backend.asarray(a) for name, a in tensors.items()
                 if name.startswith(f"step{i}.")} for i in range(steps)]
    guidance = backend.asarray(tensors["guidance"]) if "guidance" in tensors else None
    return Source(backend.asarray(tensors["start"]), captured, guidance)


STEP_TENSOR = re.compile(r"step(0|[1-9][0-9]{0,5})\.[A-Za-z0-9_]+")


def stored_steps(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> int | None:
    """How many capture steps a stored source holds, or None unless it is well formed: a `start`, only
    `stepN.NAME` tensors (and `guidance`) whose N run 0..steps-1 as the metadata says, every tensor a finite
    float16/float32 array (a checksum proves the bytes unchanged, not that they are usable)."""
    names = set(tensors) - {"start", "guidance"}
    if "start" not in tensors or not all(STEP_TENSOR.fullmatch(n) for n in names):
        return None
    indices = {int(n[4:n.index(".")]) for n in names}
    steps = len(indices)
    if indices != set(range(steps)) or metadata.get("steps") != str(steps):
        return None
    if not all(a.dtype in (np.float16, np.float32) and bool(np.isfinite(a).all()) for a in tensors.values()):
        return None
    return steps
