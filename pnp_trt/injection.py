"""The torch side of PnP: capture the tensors at a model's injection points (`ModelDims.points`) and inject them.

Forward hooks on the modules whose outputs PnP reads (ResBlock `conv2`, self-attention `to_q`/`to_k`)
record each output and, when a call asks for it, replace it with the injected tensor. The hooks hold no
state: what a UNet call captures and injects lives in a per-call `PnPCall`, published through a
context variable for the duration of that call, so concurrent calls on one module never mix.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from .contract import InjectionPoint
from .errors import PnPError


@dataclass
class PnPCall:
    """What one UNet call injects (batch-1 tensors, broadcast over the batch) and what it captured."""

    injected: dict[str, torch.Tensor]
    gates: dict[str, torch.Tensor]
    """Bool scalars keyed by `InjectionPoint.gate`: where true, that point's injected tensor is used."""
    keep: frozenset[str] | None = None
    """The points whose outputs this call records (None: all); the rest are not held."""
    captured: dict[str, torch.Tensor] = field(default_factory=dict)


_ACTIVE: ContextVar[PnPCall | None] = ContextVar("pnp_active_call", default=None)


@contextlib.contextmanager
def pnp_call(call: PnPCall) -> Iterator[PnPCall]:
    """Make `call` the one the hooks read while the UNet runs inside this block."""
    token = _ACTIVE.set(call)
    try:
        yield call
    finally:
        _ACTIVE.reset(token)


def _make_hook(point: InjectionPoint) -> Any:
    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        call = _ACTIVE.get()
        if call is None:
            return None
        if call.keep is None or point.name in call.keep:
            call.captured[point.name] = output
        injected = call.injected.get(point.name)
        if injected is None:
            return None
        return torch.where(call.gates[point.gate], injected.to(output.dtype), output)
    return hook


def missing_layers(unet: torch.nn.Module, points: tuple[InjectionPoint, ...]) -> list[str]:
    """Module paths of `points` that this UNet lacks (a preset of another family, a pruned UNet)."""
    names = {name for name, _ in unet.named_modules()}
    return [p.module for p in points if p.module not in names]


_HOOKS_ATTRIBUTE = "_pnp_trt_hooks"
_HOOKS_LOCK = threading.RLock()
"""Re-entrant: a graph's finalizer (`release_hooks`) may run from a garbage collection inside the lock."""


@dataclass
class _InstalledHooks:
    handles: list[Any]
    points: tuple[InjectionPoint, ...]
    users: int = 0


def install_hooks(unet: torch.nn.Module, points: tuple[InjectionPoint, ...]) -> None:
    """Attach the capture/inject hooks to every injection point, once per UNet: they hold no state, so every
    graph over one UNet shares them. Counted: `release_hooks` by the last user removes them."""
    with _HOOKS_LOCK:
        installed = unet.__dict__.get(_HOOKS_ATTRIBUTE)
        if installed is None:
            missing = missing_layers(unet, points)
            if missing:
                raise PnPError(f"this UNet lacks the layers of its injection preset ({', '.join(missing[:3])}"
                               f"{', …' if len(missing) > 3 else ''}); choose another --injection-preset")
            modules = dict(unet.named_modules())
            installed = _InstalledHooks([modules[p.module].register_forward_hook(_make_hook(p)) for p in points],
                                        points)
            unet.__dict__[_HOOKS_ATTRIBUTE] = installed
        elif installed.points != points:
            raise PnPError("this UNet is already hooked for another injection preset; load the model again to "
                           "use another")
        installed.users += 1


def release_hooks(unet: torch.nn.Module) -> None:
    """One user of `install_hooks` is done; the last one leaves the UNet as it was before."""
    with _HOOKS_LOCK:
        installed = unet.__dict__[_HOOKS_ATTRIBUTE]
        installed.users -= 1
        if installed.users == 0:
            for handle in installed.handles:
                handle.remove()
            del unet.__dict__[_HOOKS_ATTRIBUTE]
