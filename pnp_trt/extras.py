"""Optional parts of the install: a clear line naming the extra to install, before anything half-starts."""

from __future__ import annotations

import importlib.util

from .errors import PnPError

EXTRAS = {
    "torch": ("torch", "diffusers", "transformers", "onnx_graphsurgeon"),
    "serve": ("fastapi", "uvicorn", "prometheus_client", "multipart"),
    "ray": ("ray",),
}
"""Each extra of pyproject.toml and the modules that tell it is installed."""


def require(extra: str, what: str) -> None:
    """Raise a one-line PnPError when `extra`'s packages are missing; `what` says what needs them."""
    missing = [name for name in EXTRAS[extra] if not _installed(name)]
    if missing:
        raise PnPError(f"{what} needs {', '.join(missing)}: pip install 'pnp-trt[{extra}]'")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules as None: blocked (as the tests do)
        return False
