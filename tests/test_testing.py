"""``lazyfp8.testing``, the public tools for testing FP8 loading code: the reference formula
against hand-computed values, checkpoints written by ``write_checkpoint`` (through
``lazyfp8.save``) read back bit-exactly by ``LazyFP8View`` and by ``reference_state_dict``
(safetensors' own reader), and ``assert_bitwise_equal``'s verdicts and messages."""

import json
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lazyfp8 import LazyFP8View, PerBlock, PerChannel, PerTensor, quantize, testing
from tests.strategies import matrix_shapes, random_tensor, scales

E4M3 = torch.float8_e4m3fn


def codes(values, dtype=E4M3):
    """FP8 codes of values that FP8 holds exactly."""
    t = torch.tensor(values, dtype=torch.float32)
    c = t.to(dtype)
    assert torch.equal(c.float(), t), "not exactly representable"
    return c


def view_state(path, **kw):
    with LazyFP8View(path, **kw) as view:
        return {k: view.get_tensor(k) for k in view}


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def test_reference_per_tensor_by_hand():
    w = codes([[1.0, -2.0], [0.5, 448.0]])
    out = testing.reference(w, torch.tensor(0.25), torch.float32)
    assert out.tolist() == [[0.25, -0.5], [0.125, 112.0]]
    # a one-element scale of any shape is per-tensor too
    assert testing.reference(w, torch.tensor([[0.25]]), torch.float32).tolist() == out.tolist()


def test_reference_block_grid_with_ragged_edges_by_hand():
    # 3 x 3 weight, 2 x 2 blocks: the last block row and column are 1 wide.
    w = codes([[1.0] * 3] * 3)
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = testing.reference(w, s, torch.float32, (2, 2))
    assert out.tolist() == [[1, 1, 2], [1, 1, 2], [3, 3, 4]]


def test_reference_per_channel_is_the_block_one_row_high():
    w = codes([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    s = torch.tensor([[0.5], [2.0]])
    assert testing.reference(w, s, torch.float32, (1, 3)).tolist() == [[0.5, 1, 2], [2, 4, 8]]


def test_reference_stack_tiles_each_matrix_on_its_own():
    # two 2 x 2 matrices, one 2 x 2 block each: the grid holds one scale per matrix
    w = codes([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]]])
    s = torch.tensor([[[10.0]], [[100.0]]])
    out = testing.reference(w, s, torch.float32, (2, 2))
    assert out.tolist() == [[[10, 20], [30, 40]], [[100, 200], [300, 400]]]


def test_reference_rounds_once_from_float32():
    # 3 * (1/3 in float32) = 1.0000000298 in float64 but float32's product rounds to exactly 1.0.
    third = torch.tensor(1 / 3, dtype=torch.float32)
    assert testing.reference(codes([3.0]), third, torch.float32).item() == 1.0
    # bf16 steps by 2**-7 in [1, 2): a product halfway between two steps rounds to the even one.
    two = codes([2.0])
    assert testing.reference(two, torch.tensor(1.50390625 / 2), torch.bfloat16).item() == 1.5
    assert testing.reference(two, torch.tensor(1.51171875 / 2), torch.bfloat16).item() == 1.515625


def test_reference_of_an_empty_weight():
    out = testing.reference(torch.empty(0, 3, dtype=E4M3), torch.empty(0, 2), torch.bfloat16, (128, 128))
    assert out.shape == (0, 3) and out.dtype == torch.bfloat16


@given(shape=matrix_shapes, scale=scales, b0=st.integers(1, 130), b1=st.integers(1, 130), seed=st.integers(0, 99))
def test_reference_constant_grid_equals_per_tensor(shape, scale, b0, b1, seed):
    # Invariant: a grid that holds one value everywhere is that per-tensor scale, for any block.
    w = random_tensor(shape, torch.float32, seed).clamp(-448, 448).to(E4M3)
    grid = torch.full((-(-shape[0] // b0), -(-shape[1] // b1)), scale, dtype=torch.float32)
    per_tensor = testing.reference(w, torch.tensor(scale), torch.bfloat16)
    testing.assert_bitwise_equal(testing.reference(w, grid, torch.bfloat16, (b0, b1)), per_tensor)


def test_quantize_per_tensor_scale_and_codes():
    w = torch.tensor([[0.5, -3.5], [1.75, 0.0]])
    c, s = testing.quantize_per_tensor(w)
    assert c.dtype == E4M3 and s.shape == () and s.dtype == torch.float32
    assert s.item() == pytest.approx(3.5 / 448)
    assert c[0, 1].float().item() == -448.0  # the largest magnitude takes the largest code
    torch.testing.assert_close(testing.reference(c, s, torch.float32), w, rtol=0.07, atol=0)


# --------------------------------------------------------------------------------------------
# write_checkpoint -> LazyFP8View and reference_state_dict
# --------------------------------------------------------------------------------------------
def small_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(40, 64, generator=g).to(torch.bfloat16),
        "layers.0.q_proj.weight": torch.randn(300, 200, generator=g).to(torch.bfloat16),
        "layers.0.up_proj.weight": torch.randn(130, 64, generator=g).to(torch.bfloat16),
        "layers.0.norm.weight": torch.randn(64, generator=g).to(torch.bfloat16),
        "layers.0.norm.bias": torch.randn(64, generator=g).to(torch.float32),
        "lm_head.weight": torch.randn(40, 64, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(7),
    }


LINEARS = ["layers.0.q_proj.weight", "layers.0.up_proj.weight"]


def expected_load(state, quantized, granularity, dtype=torch.bfloat16, block=None):
    """``state`` as a loader must give it back: the quantized keys through the formula."""
    out = {}
    for k, v in state.items():
        if k in quantized:
            c, s = quantize(v, granularity, E4M3)
            out[k] = testing.reference(c, s, dtype, block)
        else:
            out[k] = v
    return out


def test_per_tensor_round_trip(tmp_path):
    state = small_model()
    res = testing.write_checkpoint(state, tmp_path)
    assert sorted(res.quantized) == LINEARS  # save's default: no head, no embeddings
    assert res.files == ["model.safetensors"] and res.index is None
    want = expected_load(state, LINEARS, PerTensor())
    testing.assert_bitwise_equal(view_state(tmp_path), want)
    testing.assert_bitwise_equal(testing.reference_state_dict(tmp_path), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_block_round_trip_with_config(tmp_path, dtype):
    state = small_model(1)
    testing.write_checkpoint(state, tmp_path, scheme="block", block_size=(128, 128), config={"model_type": "x"})
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
    want = expected_load(state, LINEARS, PerBlock((128, 128)), dtype, (128, 128))
    testing.assert_bitwise_equal(view_state(tmp_path, dtype=dtype), want)
    # the block size comes from config.json
    testing.assert_bitwise_equal(testing.reference_state_dict(tmp_path, dtype=dtype), want)


def test_sharded(tmp_path):
    state = small_model(2)
    res = testing.write_checkpoint(state, tmp_path, max_shard_size="40KB")
    assert len(res.files) > 1 and res.index == "model.safetensors.index.json"
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors")) == sorted(res.files)
    want = expected_load(state, LINEARS, PerTensor())
    testing.assert_bitwise_equal(view_state(tmp_path), want)
    testing.assert_bitwise_equal(testing.reference_state_dict(tmp_path), want)


def test_renamed_with_a_preset_and_activation_scales(tmp_path):
    # Mistral-3's released layout: legacy LLaVA names on disk, text Linears FP8 with an
    # activation_scale each, the quantization_config given verbatim.
    g = torch.Generator().manual_seed(3)
    state = {
        "model.language_model.layers.0.self_attn.q_proj.weight": torch.randn(64, 32, generator=g),
        "model.language_model.norm.weight": torch.randn(32, generator=g),
        "model.vision_tower.proj.weight": torch.randn(16, 16, generator=g),
        "lm_head.weight": torch.randn(10, 32, generator=g),
    }
    fp8 = r"^model\.language_model\.layers\.\d+\..*_proj\.weight$"
    qconfig = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None}
    res = testing.write_checkpoint(
        state, tmp_path, key_mapping="mistral3", quantize=fp8, activation_scales=True,
        config={"quantization_config": qconfig}, max_shard_size="4KB",
    )
    with open(tmp_path / "config.json") as f:
        assert json.load(f) == {"quantization_config": qconfig}
    disk = set(LazyFP8View(tmp_path))
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in disk
    assert "language_model.lm_head.weight" in disk and "vision_tower.proj.weight" in disk
    assert res.key_map["lm_head.weight"] == "language_model.lm_head.weight"
    assert "model.language_model.layers.0.self_attn.q_proj.activation_scale" in res.key_map
    want = expected_load(state, [next(iter(state))], PerTensor())
    testing.assert_bitwise_equal(view_state(tmp_path, key_mapping="mistral3"), want)
    testing.assert_bitwise_equal(testing.reference_state_dict(tmp_path, key_mapping="mistral3"), want)


def test_quantize_is_exact_no_default_exclusion(tmp_path):
    state = small_model(4)
    res = testing.write_checkpoint(state, tmp_path, quantize=lambda k: k in ("lm_head.weight", "embed.weight"))
    assert sorted(res.quantized) == ["embed.weight", "lm_head.weight"]
    with LazyFP8View(tmp_path) as view:
        assert view.info("lm_head.weight").granularity == PerTensor()
        assert view.info("layers.0.q_proj.weight").granularity is None


def test_per_channel_compressed_tensors(tmp_path):
    state = small_model(5)
    testing.write_checkpoint(state, tmp_path, scheme="per-channel", format="compressed-tensors", quantize=LINEARS)
    with LazyFP8View(tmp_path) as view:
        assert "layers.0.q_proj.weight_scale" not in view
    want = {
        k: v if k not in LINEARS else testing.reference(*quantize(v, PerChannel(), E4M3), torch.bfloat16, (1, v.shape[1]))
        for k, v in state.items()
    }
    testing.assert_bitwise_equal(view_state(tmp_path), want)
    testing.assert_bitwise_equal(testing.reference_state_dict(tmp_path), want)


def test_mx_exponent_scales(tmp_path):
    state = {"w.weight": torch.randn(8, 96, generator=torch.Generator().manual_seed(6))}
    qconfig = {"quant_method": "fp8", "scale_fmt": "ue8m0", "weight_block_size": [1, 32]}
    testing.write_checkpoint(state, tmp_path, scheme="mx", ue8m0=True, config={"quantization_config": qconfig})
    testing.assert_bitwise_equal(view_state(tmp_path), testing.reference_state_dict(tmp_path))


def test_scheme_none_writes_tensors_as_given(tmp_path):
    c, s = quantize(torch.randn(256, 130), PerBlock((128, 128)), E4M3)
    disk = {"w.weight": c, "w.weight_scale_inv": s.to(torch.bfloat16), "n.weight": torch.ones(3, dtype=torch.float16)}
    res = testing.write_checkpoint(disk, tmp_path, scheme=None, config={"quantization_config": {"quant_method": "fp8"}})
    assert res.quantized == []
    from safetensors.torch import load_file

    testing.assert_bitwise_equal(load_file(tmp_path / "model.safetensors"), disk)
    with pytest.raises(ValueError, match="pass block_size"):
        testing.reference_state_dict(tmp_path)
    got = testing.reference_state_dict(tmp_path, block_size=(128, 128))
    testing.assert_bitwise_equal(got["w.weight"], testing.reference(c, s.to(torch.bfloat16), torch.bfloat16, (128, 128)))
    testing.assert_bitwise_equal(view_state(tmp_path, block_size=(128, 128)), got)


def test_reference_state_dict_names_a_weight_without_scale(tmp_path):
    from safetensors.torch import save_file

    save_file({"w.weight": torch.zeros(2, 2, dtype=E4M3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'w.weight' has no scale"):
        testing.reference_state_dict(tmp_path)


@given(shape=matrix_shapes, seed=st.integers(0, 2**16), block=st.sampled_from([None, (128, 128), (16, 64)]))
def test_any_written_checkpoint_loads_as_its_reference(tmp_path_factory, shape, seed, block):
    path = tmp_path_factory.mktemp("w")
    state = {"a.weight": random_tensor(shape, torch.bfloat16, seed), "b.bias": random_tensor((3,), torch.float32, seed)}
    scheme = {"scheme": "per-tensor"} if block is None else {"scheme": "block", "block_size": block, "config": {}}
    testing.write_checkpoint(state, path, **scheme)
    testing.assert_bitwise_equal(view_state(path), testing.reference_state_dict(path))


# --------------------------------------------------------------------------------------------
# assert_bitwise_equal
# --------------------------------------------------------------------------------------------
def test_assert_bitwise_equal_tells_zeros_and_nans_apart():
    testing.assert_bitwise_equal(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
    with pytest.raises(AssertionError, match=r"1 of 2 elements differ; first at index \(1,\): -0.0 \(0x80000000\) != 0.0"):
        testing.assert_bitwise_equal(torch.tensor([1.0, -0.0]), torch.tensor([1.0, 0.0]))
    other_nan = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    with pytest.raises(AssertionError, match="0x7fc00001"):
        testing.assert_bitwise_equal(other_nan, torch.tensor([float("nan")]))
    with pytest.raises(AssertionError, match=r"2.0 \(0x40\) != 2.5 \(0x42\)"):
        testing.assert_bitwise_equal(codes([2.0]), codes([2.5]))


def test_assert_bitwise_equal_on_state_dicts():
    a = {"x": torch.ones(2), "y": torch.zeros(3, dtype=torch.bfloat16)}
    testing.assert_bitwise_equal(a, dict(a))
    with pytest.raises(AssertionError, match=r"missing \['y'\], unexpected \['z'\]"):
        testing.assert_bitwise_equal({"x": a["x"], "z": a["y"]}, a)
    with pytest.raises(AssertionError, match=r"'y': dtype torch.float32 != torch.bfloat16"):
        testing.assert_bitwise_equal({"x": a["x"], "y": torch.zeros(3)}, a)
    with pytest.raises(AssertionError, match=r"'x': shape \[1, 2\] != \[2\]"):
        testing.assert_bitwise_equal({"x": torch.ones(1, 2), "y": a["y"]}, a)


def test_assert_bitwise_equal_reads_lazy_values(tmp_path):
    state = {"w.weight": torch.randn(4, 4)}
    testing.write_checkpoint(state, tmp_path)
    with LazyFP8View(tmp_path) as view:
        testing.assert_bitwise_equal(dict(view), testing.reference_state_dict(tmp_path))
