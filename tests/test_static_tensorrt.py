"""The TensorRT path, checked statically here (TensorRT itself cannot be installed on CPU machines).

mypy runs over every module that uses TensorRT against `tensorrt-stubs` (TensorRT 10.13's API). Those stubs
have two syntax slips (a parameter named `in`, a non-default parameter after defaults) that stop mypy
from reading them at all, so the test reads a copy with exactly those two slips mended. The stubs still
list APIs TensorRT 11 removed, so a second test keeps those out of our code.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TENSORRT_MODULES = [ROOT / "pnp_trt" / "engines", ROOT / "pnp_trt" / "runtime" / "tensorrt_backend.py"]
REMOVED_IN_TRT11 = {
    "FP16", "BF16", "INT8", "FP8", "INT4", "FP4",  # BuilderFlag precision flags: strongly typed networks only
    "device_memory_size", "get_device_memory_size_for_profile",  # v1 memory queries (use the _v2 forms)
    "create_execution_context_without_device_memory", "device_memory",  # use USER_MANAGED + set_device_memory
    "execute_v2", "execute_async_v2", "num_bindings", "get_binding_shape", "get_binding_index",
    "set_binding_shape", "max_workspace_size", "EXPLICIT_BATCH", "int8_calibrator", "IInt8Calibrator",
    "set_precision", "precision", "set_output_type", "get_output_type",  # per-layer precision (weak typing)
}


def _stub_copy(tmp_path: Path) -> Path:
    found = {}
    for name in ("tensorrt", "tensorrt_bindings"):
        spec = subprocess.run([sys.executable, "-c", f"import {name}, os; print(list({name}.__path__)[0])"],
                              capture_output=True, text=True)
        if spec.returncode != 0:
            pytest.fail("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs==10.13.0.35.1")
        found[name] = Path(spec.stdout.strip())
    for name, source in found.items():
        (tmp_path / name).mkdir()
        for stub in source.glob("*.pyi"):
            text = stub.read_text()
            text = re.sub(r"\bin: list\[", "in_: list[", text)
            text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, "
                                "channel_axis: int = ...)")
            (tmp_path / name / stub.name).write_text(text)
    return tmp_path


def test_mypy_over_the_package_with_tensorrt_stubs(tmp_path: Path) -> None:
    """Every module (the TensorRT ones included) type-checks against the real TensorRT API's stubs."""
    stubs = _stub_copy(tmp_path)
    probe = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "-c",
                            "import tensorrt as trt\nreveal_type(trt.ICudaEngine.device_memory_size_v2)"],
                           capture_output=True, text=True, cwd=ROOT, env={"MYPYPATH": str(stubs), "PATH": ""})
    assert "Revealed type is \"Any\"" not in probe.stdout, "mypy does not see the TensorRT stubs: " + probe.stdout
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", str(ROOT / "pnp_trt")],
                            capture_output=True, text=True, cwd=ROOT, env={"MYPYPATH": str(stubs), "PATH": ""})
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_api_removed_in_tensorrt_11() -> None:
    used = []
    for path in [p for m in TENSORRT_MODULES for p in ([m] if m.is_file() else sorted(m.rglob("*.py")))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in REMOVED_IN_TRT11:
                used.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not used, used


def test_no_blanket_ignores_on_tensorrt_code() -> None:
    for path in [p for m in TENSORRT_MODULES for p in ([m] if m.is_file() else sorted(m.rglob("*.py")))]:
        assert "type: ignore" not in path.read_text(), path
