import os

import pytest
from hypothesis import HealthCheck, settings

# "ci" keeps the whole suite to a few minutes on a 2-core machine; "dev" digs deeper.
settings.register_profile(
    "ci",
    max_examples=25,
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


@pytest.fixture(params=["torch", "jit"])
def backend(request, monkeypatch):
    """Run a kernel test once with the pure-torch kernels and once with the compiled ones."""
    from lazyfp8 import _jit

    if request.param == "torch":
        monkeypatch.setenv("LAZYFP8_JIT", "0")
    else:
        monkeypatch.delenv("LAZYFP8_JIT", raising=False)
        if _jit.kernels() is None:
            pytest.skip("compiled kernels unavailable (llvmlite not installed)")
    return request.param
