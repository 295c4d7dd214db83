"""The CUDA path. Runs only where a GPU is present (skipped on CPU-only machines)."""

import pytest
import torch
from safetensors import safe_open

from lazyfp8 import LazyFP8View, PerBlock, PerChannel, PerTensor, init_empty_weights, load_into, save
from tests.helpers import bits, reference
from tests.helpers import save as save_file
from tests.strategies import fp8_codes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def ckpt(tmp_path):
    save_file(
        {
            "a.weight": fp8_codes((300, 200), torch.float8_e4m3fn, 0),  # every code, NaN included
            "a.weight_scale_inv": torch.tensor(0.03),
            "b.weight": torch.randn(50, 60).to(torch.bfloat16),
            "c.weight": fp8_codes((300, 200), torch.float8_e5m2, 1),
            "c.weight_scale_inv": torch.rand(3, 2) + 0.1,
        },
        str(tmp_path / "m.safetensors"),
    )
    return str(tmp_path)


def same_but_nan_payload(a, b):
    """Bit-equal, except that NaNs only need to be NaN on both sides: CUDA's float -> bf16/f16
    conversion writes another NaN payload than the CPU's (0x7FFF vs 0xFFFF for bf16)."""
    nan = torch.isnan(a.float())
    return torch.equal(nan, torch.isnan(b.float())) and torch.equal(bits(a)[~nan], bits(b)[~nan])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk", [4096, 1 << 21])
def test_get_tensor_on_cuda_is_the_reference_formula_on_the_gpu(ckpt, dtype, chunk):
    cpu = LazyFP8View(ckpt, dtype=dtype, block_size=(128, 128))
    gpu = LazyFP8View(ckpt, dtype=dtype, block_size=(128, 128), device="cuda", chunk_elements=chunk)
    for k in cpu:
        t = gpu.get_tensor(k)
        assert t.device.type == "cuda"
        info = cpu.info(k)
        if info.scale_key is not None:
            with safe_open(info.file, "pt") as f:
                codes = f.get_tensor(info.disk_key)
            ref = reference(codes.cuda(), cpu.scale(k).cuda(), dtype, info.granularity.block_size(info.shape))
            assert torch.equal(bits(t), bits(ref)), k  # the formula evaluated on the same device
        assert same_but_nan_payload(t.cpu(), cpu.get_tensor(k)), k


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_copy_into_cuda_parameter_of_any_dtype(ckpt, param_dtype):
    view = LazyFP8View(ckpt, chunk_elements=4096, block_size=(128, 128))
    for k in view:
        dst = torch.empty(view[k].shape, dtype=param_dtype, device="cuda")
        dst.copy_(view[k])
        ref = torch.empty(view[k].shape, dtype=param_dtype).copy_(view.get_tensor(k))
        assert same_but_nan_payload(dst.cpu(), ref), k


@pytest.mark.parametrize("scheme", [PerTensor(), PerChannel(), PerBlock((128, 128))])
def test_gpu_memory_above_the_model_is_a_few_chunks(tmp_path, scheme):
    fmt = "compressed-tensors" if isinstance(scheme, PerChannel) else "fp8"
    save({"big.weight": torch.randn(4096, 4096)}, tmp_path, scheme=scheme, format=fmt)
    chunk = 1 << 20
    block = getattr(scheme, "block", None)
    view = LazyFP8View(tmp_path, device="cuda", chunk_elements=chunk, block_size=block)
    dst = torch.empty(4096, 4096, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    dst.copy_(view["big.weight"])
    torch.cuda.synchronize()
    above = torch.cuda.max_memory_allocated() - base
    # two code buffers (1 B) + int32 indices (4 B) + float32 products (4 B) per chunk element
    assert above <= chunk * (2 + 4 + 4) + (1 << 20), above
    assert same_but_nan_payload(dst.cpu(), LazyFP8View(tmp_path, block_size=block).get_tensor("big.weight"))


def test_load_into_a_meta_model_on_cuda(ckpt):
    view = LazyFP8View(ckpt, device="cuda", block_size=(128, 128))
    with init_empty_weights():
        model = torch.nn.Module()
        for name in ("a", "b", "c"):
            setattr(model, name, torch.nn.Linear(1, 1, bias=False))
        model.a.weight = torch.nn.Parameter(torch.empty(300, 200, dtype=torch.bfloat16, device="meta"))
        model.b.weight = torch.nn.Parameter(torch.empty(50, 60, dtype=torch.bfloat16, device="meta"))
        model.c.weight = torch.nn.Parameter(torch.empty(300, 200, dtype=torch.bfloat16, device="meta"))
    load_into(model, view)
    cpu = LazyFP8View(ckpt, block_size=(128, 128))
    for k, v in model.state_dict().items():
        assert v.device.type == "cuda" and same_but_nan_payload(v.cpu(), cpu.get_tensor(k))


@pytest.mark.parametrize("form", ["modelopt", "nvfp4-ct", "mxfp4", "int4"])
@pytest.mark.parametrize("chunk", [100, 1 << 21])
def test_packed_weights_on_cuda_equal_the_cpu(tmp_path, form, chunk):
    """Packed FP4 / int4 codes cross to the GPU packed and are dequantized there: the same values
    as the CPU path (NaN payloads aside), whole and as boxes that start inside a byte."""
    from tests import test_packed as P

    {"modelopt": P.modelopt_nvfp4, "nvfp4-ct": P.ct_nvfp4, "mxfp4": P.gpt_oss_mxfp4, "int4": P.ct_int4}[form](tmp_path)
    cpu = LazyFP8View(tmp_path)
    gpu = LazyFP8View(tmp_path, device="cuda", chunk_elements=chunk)
    for k in cpu:
        want = cpu.get_tensor(k)
        assert same_but_nan_payload(gpu.get_tensor(k).cpu(), want), k
        box = tuple(slice(1, n - 1) if n > 2 else slice(None) for n in want.shape[:-1]) + (slice(3, want.shape[-1] - 1),)
        dst = torch.empty(want[box].shape, dtype=want.dtype, device="cuda")
        gpu.read_box(k, dst, [s.start or 0 for s in box], list(want[box].shape))
        assert same_but_nan_payload(dst.cpu(), want[box]), k
