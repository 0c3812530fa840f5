"""Loads the compiled FFI handlers and registers them with XLA, once, per platform.

The CPU module is always built. The CUDA module exists when the package was built with a CUDA
compiler; it links cudart statically, so importing it needs no GPU (XLA defers the CUDA
registration on machines without one).
"""
from __future__ import annotations

import importlib

import jax

try:
    _cpu = importlib.import_module("pit_jax._pit_cpu")
except ImportError as err:
    import os
    raise ImportError(
        "pit_jax's compiled FFI module is missing from "
        f"{os.path.dirname(__file__)}. Install the package (`pip install .`) and import it from "
        "outside the source tree (run the tests with `pytest`, not `python -m pytest`, from the "
        "repository root).") from err
try:
    _cuda = importlib.import_module("pit_jax._pit_cuda")
except ImportError as err:  # built without nvcc: CPU only, said loudly at lowering time
    _cuda = None
    _cuda_import_error = str(err)
else:
    _cuda_import_error = None

for _name, _capsule in _cpu.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
if _cuda is not None:
    for _name, _capsule in _cuda.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")


def cuda_available() -> bool:
    """True when the CUDA kernels were compiled into this install."""
    return _cuda is not None


def require_cuda(op: str) -> None:
    """Raise a clear error when a CUDA lowering is asked for but no kernels were built."""
    if _cuda is None:
        raise NotImplementedError(
            f"pit_jax.{op}: this install of pit_jax has no CUDA kernels (it was built without a "
            f"CUDA compiler: {_cuda_import_error}). Rebuild with nvcc on the PATH, e.g. "
            "`PIT_ENABLE_CUDA=ON pip install --no-build-isolation .`, or run on the CPU backend.")


def build_info() -> dict:
    """What this install was built with."""
    info = {"cpu_ffi_api": tuple(_cpu.ffi_api_version), "cuda": _cuda is not None}
    if _cuda is not None:
        info["cuda_ffi_api"] = tuple(_cuda.ffi_api_version)
        info["cuda_architectures"] = _cuda.cuda_architectures
        info["moe_staged"] = bool(getattr(_cuda, "moe_staged", False))  # CUTLASS grouped GEMM built
    else:
        info["cuda_missing_reason"] = _cuda_import_error
    return info
