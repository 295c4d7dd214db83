"""The CUDA path. Runs only where a GPU is present."""

import pytest
import torch

from lazyfp8 import LazyFP8View
from tests.helpers import bits, save
from tests.strategies import fp8_codes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def ckpt(tmp_path):
    save(
        {
            "a.weight": fp8_codes((300, 200), torch.float8_e4m3fn, 0),
            "a.weight_scale_inv": torch.tensor(0.03),
            "b.weight": torch.randn(50, 60).to(torch.bfloat16),
        },
        str(tmp_path / "m.safetensors"),
    )
    return str(tmp_path)


def test_get_tensor_on_cuda_matches_cpu(ckpt):
    cpu = LazyFP8View(ckpt)
    gpu = LazyFP8View(ckpt, device="cuda")
    for k in cpu:
        t = gpu.get_tensor(k)
        assert t.device.type == "cuda"
        assert torch.equal(bits(t.cpu()), bits(cpu.get_tensor(k)))


def test_copy_into_cuda_parameter(ckpt):
    view = LazyFP8View(ckpt, chunk_elements=4096)
    for k in view:
        dst = torch.empty(view[k].shape, dtype=torch.float32, device="cuda")
        dst.copy_(view[k])
        assert torch.equal(bits(dst.cpu()), bits(view.get_tensor(k).float()))
