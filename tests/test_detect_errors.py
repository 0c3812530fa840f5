"""Bad input is rejected at trace time with an error that names the argument."""
import jax.numpy as jnp
import numpy as np
import pytest

import pit_jax


@pytest.mark.parametrize("x, tile, layout, exc, words", [
    (jnp.ones((8,)), (1, 1), "row", ValueError, "rank"),
    (jnp.ones((8, 8), jnp.int32), (1, 1), "row", TypeError, "bfloat16, float16 or float32"),
    (jnp.ones((8, 8), jnp.float64 if False else jnp.uint8), (1, 1), "row", TypeError, "x must be"),
    (jnp.ones((8, 8)), (0, 1), "row", ValueError, "positive"),
    (jnp.ones((8, 8)), (2, -3), "row", ValueError, "positive"),
    (jnp.ones((8, 8)), (2,), "row", TypeError, "pair"),
    (jnp.ones((8, 8)), (2.0, 1), "row", TypeError, "pair"),
    (jnp.ones((8, 8)), 4, "row", TypeError, "pair"),
    (jnp.ones((8, 8)), (16, 1), "row", ValueError, "tm=16 is larger"),
    (jnp.ones((8, 8)), (1, 9), "row", ValueError, "tk=9 is larger"),
    (jnp.ones((8, 8)), (1, 1), "diag", ValueError, "layout"),
    (jnp.ones((0, 8)), (1, 1), "row", ValueError, "non-empty"),
    ([[1.0, 2.0]], (1, 1), "row", TypeError, "array"),
])
def test_bad_input(x, tile, layout, exc, words):
    with pytest.raises(exc, match=words):
        pit_jax.detect(x, tile, layout=layout)


def test_error_raised_at_trace_time():
    import jax
    with pytest.raises(ValueError, match="tm=64"):
        jax.jit(lambda x: pit_jax.detect(x, (64, 1))).trace(jax.ShapeDtypeStruct((8, 8), jnp.float32))


def test_numpy_input_accepted():
    idx = pit_jax.detect(np.eye(4, dtype=np.float32), (2, 2))
    np.testing.assert_array_equal(np.asarray(idx.counts), [1, 1])


def test_index_capacity_limit():
    import jax
    big = jax.ShapeDtypeStruct((65536, 65536), jnp.bfloat16)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        jax.jit(lambda x: pit_jax.detect(x, (1, 1))).trace(big)
    jax.jit(lambda x: pit_jax.detect(x, (32, 1))).trace(big)  # 2**27 tiles: fine
