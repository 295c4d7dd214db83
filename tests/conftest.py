import os

import pytest
from hypothesis import HealthCheck, settings

# "ci" keeps the whole suite to a few minutes on a 2-core machine and draws the same examples on
# every run (a CI result must not depend on the draw); "dev" digs deeper, with fresh draws.
settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=["torch", "jit", "jit-scalar"])
def backend(request, monkeypatch):
    """Run a kernel test with the pure-torch kernels, the best compiled ones, and the portable
    compiled ones (what CPUs without AVX-512 VBMI run)."""
    from lazyfp8.kernels import jit as _jit

    monkeypatch.setenv("LAZYFP8_JIT", {"torch": "0", "jit": "1", "jit-scalar": "scalar"}[request.param])
    if request.param != "torch" and _jit.kernels() is None:
        pytest.skip("compiled kernels unavailable (llvmlite not installed)")
    return request.param
