"""Hypothesis strategies shared by every test module."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
PASSTHROUGH_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.int32, torch.uint8, torch.bool]

_name = st.sampled_from(["a", "b", "mlp", "attn", "proj", "norm", "x1", "layers"])


@st.composite
def key_trees(draw: st.DrawFn, min_size: int = 1, max_size: int = 12) -> list[str]:
    """Distinct dotted keys like ``layers.3.mlp.weight``."""
    keys = draw(
        st.lists(
            st.lists(st.one_of(_name, st.integers(0, 5).map(str)), min_size=1, max_size=4).map(
                lambda parts: ".".join(parts) + ".weight"
            ),
            min_size=min_size,
            max_size=max_size,
            unique=True,
        )
    )
    return keys


shapes = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, 70)),
    st.tuples(st.integers(0, 40), st.integers(0, 40)),
    st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
)

matrix_shapes = st.tuples(st.integers(1, 300), st.integers(1, 300))

# Scales spanning the float32 range that still keep w * s finite for |w| <= 448.
scales = st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False).filter(
    lambda x: x > 0
)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if not dtype.is_floating_point:
        return torch.randint(0, 100, shape, generator=g).to(dtype)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


def fp8_codes(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Uniformly random bytes (every code, NaN included) as an FP8 tensor."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8).view(dtype)
