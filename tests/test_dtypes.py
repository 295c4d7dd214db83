"""The one dtype table: every fact about a dtype that the package uses comes from it."""

import torch
from safetensors.torch import _TYPES as SAFETENSORS_CODES  # code -> torch dtype, as safetensors writes

from lazyfp8.storage import dtypes as _dtypes


def test_codes_and_sizes_agree_with_torch_and_safetensors():
    for code, row in _dtypes._BY_CODE.items():
        assert row.itemsize == row.torch.itemsize, code
        if code in SAFETENSORS_CODES:
            assert SAFETENSORS_CODES[code] == row.torch, code
        assert _dtypes.by_torch(row.torch) is row and _dtypes.by_code(code) is row


def test_fp8_max_is_the_largest_finite_value_of_each_format():
    assert set(_dtypes.FP8_MAX) == {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}
    for dtype, fmax in _dtypes.FP8_MAX.items():
        assert fmax == torch.finfo(dtype).max, dtype
        assert _dtypes.by_torch(dtype).fp8_weight


def test_scales_and_targets():
    assert _dtypes.SCALE_CODES == {"F32", "BF16", "F16", "F64", "U8", "F8_E8M0"}
    assert _dtypes.TARGETS == (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    assert not (_dtypes.FP8_WEIGHT_CODES & _dtypes.SCALE_CODES)
