"""Packaging: importing pit_jax keeps JAX's CPU backend working; build info is truthful."""
import subprocess
import sys

import pit_jax


def test_import_keeps_cpu_backend_working(tmp_path):
    code = ("import pit_jax, jax, jax.numpy as jnp; "
            "assert jax.devices('cpu'); "
            "assert float(jnp.arange(4.0).sum()) == 6.0; "
            "print('ok', pit_jax.build_info())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_build_info_ffi_api_not_newer_than_jaxlib():
    import jax
    info = pit_jax.build_info()
    assert info["cpu_ffi_api"][0] == 0 and info["cpu_ffi_api"][1] >= 3
    # jaxlib 0.10.x speaks FFI API 0.3, 0.11.x 0.4: a handler built on newer headers is rejected.
    jaxlib_minor = int(jax.lib.__version__.split(".")[1]) if hasattr(jax.lib, "__version__") else None
    if jaxlib_minor is not None and jaxlib_minor <= 10:
        assert info["cpu_ffi_api"] == (0, 3)
    assert isinstance(info["cuda"], bool)


def test_cuda_lowering_without_kernels_is_a_clear_error(monkeypatch):
    """An install built without nvcc must refuse GPU lowering loudly, never fall back silently."""
    import jax
    import jax.numpy as jnp
    import pytest
    from pit_jax import _ext
    monkeypatch.setattr(_ext, "_cuda", None)
    monkeypatch.setattr(_ext, "_cuda_import_error", "test: no CUDA module")
    f = jax.jit(lambda x: pit_jax.detect(x, (8, 1)).counts)
    with pytest.raises(NotImplementedError, match="no CUDA kernels"):
        f.trace(jax.ShapeDtypeStruct((16, 16), jnp.float32)).lower(lowering_platforms=("cuda",))
