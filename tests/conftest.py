import os

# Handlers fill outputs with a poison byte first, so exact comparisons prove every element
# was written. Must be set before pit_jax's handlers first run.
os.environ.setdefault("PIT_DEBUG_POISON_OUTPUTS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

# References and the dense parts of gradients use jnp matmuls; on GPU their default fp32
# precision is TF32. The kernels accumulate exact fp32, so compare against exact fp32.
jax.config.update("jax_default_matmul_precision", "highest")


def _backends():
    names = ["cpu"]
    try:
        if jax.devices("gpu"):
            names.append("gpu")
    except RuntimeError:
        pass
    return names


BACKENDS = _backends()


def pytest_report_header(config):
    import pit_jax
    return f"jax {jax.__version__}; backends {BACKENDS}; pit_jax {pit_jax.build_info()}"


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test body with this backend's first device as the default device."""
    with jax.default_device(jax.devices(request.param)[0]):
        yield request.param
