"""PnP-aware request batching: requests on the same guidance and settings that arrive within a short window
share one translation — one inversion and capture (the source) and one injection batch of all their prompts —
and each gets its own images back.

Runs on the server's event loop; the translations themselves run on a small thread pool (the `Translator`
is thread-safe). A group stops at its next sampling step once no request in it waits any more: each is past its
deadline or its client has left.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from ..config import TranslateConfig
from ..images import Guidance
from ..runtime.translation import Translation


def group_key(data: bytes, source_prompt: str | None, settings: dict[str, Any]) -> str:
    """What requests must share to share a translation: the guidance (image bytes or source prompt) and every
    setting."""
    return hashlib.sha256(data + json.dumps([source_prompt, settings], sort_keys=True).encode()).hexdigest()


class DeadlineExceeded(Exception):
    """Raised from the progress callback: nobody waits for this translation any more."""


@dataclass
class Group:
    """Requests that share one translation: the guidance, the settings and, per request, its prompts."""

    image: Guidance | None
    source_prompt: str | None
    config: TranslateConfig
    members: list[tuple[list[str], asyncio.Future[tuple[Translation, slice]]]] = field(default_factory=list)
    deadline: float = 0.0
    """time.monotonic() after which no member waits any more."""

    def join(self, prompts: list[str], deadline: float) -> asyncio.Future[tuple[Translation, slice]]:
        future: asyncio.Future[tuple[Translation, slice]] = asyncio.get_running_loop().create_future()
        self.members.append((list(prompts), future))
        self.deadline = max(self.deadline, deadline)
        return future

    def waited_until(self) -> float:
        """time.monotonic() after which nobody waits: the latest deadline, or 0 (long past) once every member
        has stopped waiting (its future cancelled: its client left or its request timed out)."""
        return self.deadline if any(not future.done() for _, future in self.members) else 0.0

    @property
    def prompts(self) -> list[str]:
        return [p for prompts, _ in self.members for p in prompts]


Run = Callable[[Group, Callable[[str, int], Callable[[], None]]], Translation]
"""run(group, progress) → one translation of all the group's prompts (on a worker thread)."""


class Coalescer:
    """Collects requests by key for `window_s` after the first of a key arrives, then runs them as one."""

    def __init__(self, run: Run, executor: Executor, window_s: float):
        self.run, self.executor, self.window_s = run, executor, window_s
        self._open: dict[str, Group] = {}

    async def submit(self, key: str, image: Guidance | None, source_prompt: str | None, config: TranslateConfig,
                     prompts: list[str], deadline: float) -> tuple[Translation, slice]:
        """This request's share of its group's translation: the translation and the slice of its images."""
        group = self._open.get(key)
        if group is None:
            group = self._open[key] = Group(image, source_prompt, config)
            asyncio.get_running_loop().call_later(self.window_s, self._start, key)
        return await group.join(prompts, deadline)

    def _start(self, key: str) -> None:
        group = self._open.pop(key)
        task = asyncio.get_running_loop().run_in_executor(self.executor, self.run, group,
                                                          DeadlineCheck(group.waited_until))
        task.add_done_callback(lambda done: _deliver(group, done))


class DeadlineCheck:
    """A progress callback that stops the translation at its next step once `deadline()` (time.monotonic())
    has passed: for a group, when every member has stopped waiting. `seconds_left` travels to another process (a
    Ray model replica), whose own check then stops its work too."""

    def __init__(self, deadline: Callable[[], float]):
        self.deadline = deadline

    @classmethod
    def within(cls, seconds: float) -> DeadlineCheck:
        end = time.monotonic() + seconds
        return cls(lambda: end)

    def seconds_left(self) -> float:
        return self.deadline() - time.monotonic()

    def __call__(self, stage: str, total: int) -> Callable[[], None]:
        def advance() -> None:
            if time.monotonic() > self.deadline():
                raise DeadlineExceeded(f"past the deadline in {stage}")
        advance()
        return advance


def _deliver(group: Group, done: asyncio.Future[Translation]) -> None:
    """Each member's slice of the images, or the group's error, to every member still waiting."""
    error = done.exception()
    first = 0
    for prompts, future in group.members:
        share, first = slice(first, first + len(prompts)), first + len(prompts)
        if future.done():  # cancelled: its request timed out or its client left
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result((done.result(), share))
