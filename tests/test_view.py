import gc
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lazyfp8
from lazyfp8 import (
    CheckpointError,
    InvalidScaleError,
    KeyMappingError,
    LazyFP8View,
    LazyTensor,
    MissingScaleError,
    PerBlock,
    PerChannel,
    PerTensor,
    ScaleShapeError,
    TensorNotFoundError,
    UnsupportedDtypeError,
)
from tests.helpers import bits, reference, save, write_sharded
from tests.strategies import FLOAT_DTYPES, PASSTHROUGH_DTYPES, fp8_codes, random_tensor, scales, shapes

E4 = torch.float8_e4m3fn


def mixed_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        # per-tensor, HF "fp8" convention, with an unused activation scale
        "layers.0.q_proj.weight": fp8_codes((48, 32), E4, 1),
        "layers.0.q_proj.weight_scale_inv": torch.tensor(0.02),
        "layers.0.q_proj.activation_scale": torch.tensor(1.5),
        # per-channel, compressed-tensors convention, with input and KV scales
        "layers.0.k_proj.weight": fp8_codes((16, 32), torch.float8_e5m2, 2),
        "layers.0.k_proj.weight_scale": torch.rand(16, 1, generator=g) + 0.01,
        "layers.0.k_proj.input_scale": torch.tensor(1.0),
        "layers.0.k_scale": torch.tensor(1.0),
        # block scales: 300x200 with 128x128 blocks is a ragged 3x2 grid
        "layers.0.mlp.weight": fp8_codes((300, 200), E4, 3),
        "layers.0.mlp.weight_scale_inv": (torch.rand(3, 2, generator=g) + 0.1).to(torch.bfloat16),
        # pass-through
        "embed.weight": torch.randn(10, 32, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(32, generator=g).to(torch.float16),
        "bias": torch.randn(5, generator=g),
        "position_ids": torch.arange(7),
        "mask": torch.tensor([True, False]),
    }


@pytest.fixture
def mixed(tmp_path):
    t = mixed_tensors()
    keys = list(t)
    write_sharded(
        str(tmp_path),
        # the block weight's scale lives in another shard than the weight
        {
            "a.safetensors": {k: t[k] for k in keys[:8]},
            "b.safetensors": {k: t[k] for k in keys[8:]},
        },
    )
    return str(tmp_path), t


def test_keys_hide_scales_and_activation_scales(mixed):
    path, t = mixed
    view = LazyFP8View(path, block_size=(128, 128))
    assert set(view) == {
        "layers.0.q_proj.weight",
        "layers.0.k_proj.weight",
        "layers.0.mlp.weight",
        "embed.weight",
        "norm.weight",
        "bias",
        "position_ids",
        "mask",
    }
    assert len(view) == 8
    assert "layers.0.q_proj.weight_scale_inv" not in view


def test_metadata_from_header_only(mixed, monkeypatch):
    path, t = mixed
    view = LazyFP8View(path, block_size=(128, 128), dtype=torch.float16)
    monkeypatch.setattr(lazyfp8._reader.ShardFile, "read_into", lambda *a: pytest.fail("read data"))
    v = view["layers.0.mlp.weight"]
    assert isinstance(v, LazyTensor)
    assert v.shape == torch.Size([300, 200]) and v.dtype == torch.float16 and v.device == torch.device("cpu")
    assert view["norm.weight"].dtype == torch.float16 and view["bias"].dtype == torch.float32
    assert view.info("layers.0.mlp.weight").granularity == PerBlock((128, 128))
    assert view.info("layers.0.k_proj.weight").granularity == PerChannel()
    assert view.info("layers.0.q_proj.weight").granularity == PerTensor()
    assert view.info("layers.0.mlp.weight").scale_file.endswith("b.safetensors")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fp8_bit_exact_to_reference(mixed, dtype):
    path, t = mixed
    view = LazyFP8View(path, block_size=(128, 128), dtype=dtype)
    for key, skey, block in [
        ("layers.0.q_proj.weight", "layers.0.q_proj.weight_scale_inv", None),
        ("layers.0.k_proj.weight", "layers.0.k_proj.weight_scale", None),
        ("layers.0.mlp.weight", "layers.0.mlp.weight_scale_inv", (128, 128)),
    ]:
        s = t[skey]
        if s.numel() > 1 and block is None:  # per-channel: broadcast along columns
            ref = reference(t[key], s, dtype)
        else:
            ref = reference(t[key], s, dtype, block)
        got = view.get_tensor(key)
        assert got.dtype == dtype and got.shape == ref.shape
        assert torch.equal(bits(got), bits(ref)), key


def test_passthrough_bit_exact_in_stored_dtype(mixed):
    path, t = mixed
    view = LazyFP8View(path, block_size=(128, 128), dtype=torch.float32)
    for key in ["embed.weight", "norm.weight", "bias", "position_ids", "mask"]:
        got = view.get_tensor(key)
        assert got.dtype == t[key].dtype
        assert torch.equal(bits(got), bits(t[key])), key


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("key", ["layers.0.q_proj.weight", "layers.0.mlp.weight", "embed.weight"])
def test_copy_into_param_of_any_dtype_equals_copy_of_get_tensor(mixed, param_dtype, key):
    path, _ = mixed
    view = LazyFP8View(path, block_size=(128, 128), chunk_elements=1000)
    shape = view[key].shape
    a = torch.empty(shape, dtype=param_dtype)
    b = torch.empty(shape, dtype=param_dtype)
    a.copy_(view[key])
    b.copy_(view.get_tensor(key))
    assert torch.equal(bits(a), bits(b))


def test_non_contiguous_destination(mixed):
    path, _ = mixed
    view = LazyFP8View(path, block_size=(128, 128))
    dst = torch.empty(200, 300, dtype=torch.bfloat16).t()
    dst.copy_(view["layers.0.mlp.weight"])
    assert torch.equal(bits(dst), bits(view.get_tensor("layers.0.mlp.weight")))


def test_torch_functions_accept_lazy_values(mixed):
    path, t = mixed
    view = LazyFP8View(path, block_size=(128, 128))
    assert torch.equal(view["embed.weight"], t["embed.weight"])
    assert torch.allclose(view["bias"] * 2, t["bias"] * 2)
    assert view["bias"].sum().item() == pytest.approx(t["bias"].sum().item())
    assert torch.equal(view["position_ids"][3], t["position_ids"][3])


def test_missing_key_is_a_key_error_with_a_hint(mixed):
    path, _ = mixed
    view = LazyFP8View(path, block_size=(128, 128), key_mapping={r"^layers\.": "model.layers."})
    with pytest.raises(KeyError):
        view["nope"]
    with pytest.raises(TensorNotFoundError, match="on-disk name of 'model.layers.0.mlp.weight'"):
        view["layers.0.mlp.weight"]
    with pytest.raises(TensorNotFoundError, match="did you mean 'model.layers.0.mlp.weight'"):
        view["model.layers.0.mlp.weights"]
    assert view.get("nope") is None
    assert view.disk_key("model.layers.0.mlp.weight") == "layers.0.mlp.weight"
    with pytest.raises(KeyError):
        view.disk_key("layers.0.mlp.weight")


def test_read_only(mixed):
    view = LazyFP8View(mixed[0], block_size=(128, 128))
    with pytest.raises(TypeError):
        view["bias"] = torch.zeros(5)  # type: ignore[index]
    with pytest.raises((TypeError, AttributeError)):
        del view["bias"]  # type: ignore[attr-defined]


def test_missing_scale_names_tensor_and_shard(tmp_path):
    save({"w.weight": fp8_codes((4, 4), E4, 0)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MissingScaleError, match="model.safetensors.*'w.weight'.*'w.weight_scale_inv'") as e:
        LazyFP8View(tmp_path)
    assert e.value.key == "w.weight"


def test_two_scales_are_ambiguous(tmp_path):
    save(
        {"w.weight": fp8_codes((4, 4), E4, 0), "w.weight_scale_inv": torch.tensor(1.0), "w.weight_scale": torch.tensor(1.0)},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="two scales"):
        LazyFP8View(tmp_path)


def test_scale_of_wrong_shape(tmp_path):
    save({"w.weight": fp8_codes((6, 4), E4, 0), "w.weight_scale_inv": torch.ones(3, 2)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ScaleShapeError, match=r"shape \[3, 2\].*'w.weight' of shape \[6, 4\].*weight_block_size"):
        LazyFP8View(tmp_path)
    # with a block size that does not fit either
    with pytest.raises(ScaleShapeError, match=r"\[2, 1\] for blocks of \[4, 4\]"):
        LazyFP8View(tmp_path, block_size=(4, 4))
    # and one that fits
    assert LazyFP8View(tmp_path, block_size=(2, 2)).info("w.weight").granularity == PerBlock((2, 2))


def test_scale_of_unsupported_dtype(tmp_path):
    save({"w.weight": fp8_codes((2, 2), E4, 0), "w.weight_scale_inv": torch.tensor(1, dtype=torch.int32)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(UnsupportedDtypeError, match="'w.weight_scale_inv'.*I32"):
        LazyFP8View(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_invalid_scale_values_raise_on_access(tmp_path, bad):
    save({"w.weight": fp8_codes((2, 2), E4, 0), "w.weight_scale_inv": torch.tensor(bad)}, str(tmp_path / "m.safetensors"))
    view = LazyFP8View(tmp_path)
    with pytest.raises(InvalidScaleError, match="'w.weight_scale_inv'.*finite and positive"):
        view.get_tensor("w.weight")


def test_ue8m0_scale_bytes(tmp_path):
    codes = fp8_codes((4, 64), E4, 5)
    exps = torch.tensor([[120, 127], [130, 1], [127, 127], [140, 100]], dtype=torch.uint8)
    save({"w.weight": codes, "w.weight_scale_inv": exps}, str(tmp_path / "m.safetensors"))
    view = LazyFP8View(tmp_path, block_size=(1, 32))
    s = torch.pow(2.0, exps.to(torch.float32) - 127)
    assert torch.equal(bits(view.get_tensor("w.weight")), bits(reference(codes, s, torch.bfloat16, (1, 32))))


def test_target_dtype_must_be_floating(mixed):
    with pytest.raises(ValueError, match="dtype must be"):
        LazyFP8View(mixed[0], block_size=(128, 128), dtype=torch.int8)


def test_presets_and_mapping_errors(mixed):
    path, _ = mixed
    with pytest.raises(KeyMappingError, match="unknown key mapping preset 'mistral9'.*mistral3"):
        LazyFP8View(path, block_size=(128, 128), key_mapping="mistral9")
    with pytest.raises(KeyMappingError, match="'embed.weight' and 'norm.weight'|'norm.weight' and 'embed.weight'"):
        LazyFP8View(path, block_size=(128, 128), key_mapping={r"^(embed|norm)\.weight$": "same"})


def test_view_holds_no_tensor_data_after_use(mixed):
    path, _ = mixed
    view = LazyFP8View(path, block_size=(128, 128))
    for k in view:
        view.get_tensor(k)
        torch.empty(view[k].shape, dtype=view[k].dtype).copy_(view[k])
    seen, stack, found = set(), [view], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            continue
        stack.extend(gc.get_referents(obj))
    assert [t for t in found if t.numel() > 256] == []  # only the kernels' 256-entry code tables may be shared


def test_closing_and_reopening(mixed):
    path, t = mixed
    with LazyFP8View(path, block_size=(128, 128)) as view:
        assert torch.equal(view.get_tensor("bias"), t["bias"])
    assert torch.equal(view.get_tensor("bias"), t["bias"])  # reopens on demand
    view.close()


@st.composite
def checkpoints(draw):
    n = draw(st.integers(1, 6))
    specs = []
    for i in range(n):
        quantized = draw(st.booleans())
        shape = draw(shapes)
        dtype = E4 if quantized else draw(st.sampled_from(PASSTHROUGH_DTYPES))
        scale = draw(scales) if quantized else None
        specs.append((f"blk.{i}.w", shape, dtype, scale))
    shards = draw(st.integers(1, n))
    prefix = draw(st.sampled_from(["", "model.", "a.b."]))
    chunk = draw(st.integers(1, 5000))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    return specs, shards, prefix, chunk, dtype


@given(checkpoints())
def test_property_any_shapes_scales_shards_and_mapping(tmp_path_factory, ck):
    specs, nshards, prefix, chunk, dtype = ck
    d = str(tmp_path_factory.mktemp("p"))
    tensors, expected = {}, {}
    for i, (key, shape, dt, scale) in enumerate(specs):
        if scale is None:
            tensors[key] = random_tensor(shape, dt, i)
            expected[prefix + key] = tensors[key]
        else:
            tensors[key] = fp8_codes(shape, dt, i)
            tensors[key + "_scale_inv"] = torch.tensor(scale, dtype=torch.float32)
            expected[prefix + key] = reference(tensors[key], tensors[key + "_scale_inv"], dtype)
    keys = list(tensors)
    per = -(-len(keys) // nshards)
    write_sharded(d, {f"s{j}.safetensors": {k: tensors[k] for k in keys[j : j + per]} for j in range(0, len(keys), per)})
    mapping = {r"^blk\.": prefix + "blk."} if prefix else None
    view = LazyFP8View(d, key_mapping=mapping, dtype=dtype, chunk_elements=chunk)
    assert set(view) == set(expected)
    for k, ref in expected.items():
        got = view.get_tensor(k)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert torch.equal(bits(got), bits(ref)), k
        assert view.disk_key(k) == k[len(prefix):]
    assert os.listdir(d)


def test_file_truncated_after_the_view_was_built(tmp_path):
    path = save({"w.weight": torch.randn(64, 64)}, str(tmp_path / "m.safetensors"))
    view = LazyFP8View(path, block_size=(128, 128))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(lazyfp8.CorruptCheckpointError, match="m.safetensors.*'w.weight'.*truncated"):
        view.get_tensor("w.weight")


def test_e4m3fnuz_same_bits_mean_half_and_0x80_is_nan(tmp_path):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    save(
        {
            "fn.weight": codes.view(torch.float8_e4m3fn), "fn.weight_scale_inv": torch.tensor(1.0),
            "uz.weight": codes.clone().view(torch.float8_e4m3fnuz), "uz.weight_scale_inv": torch.tensor(1.0),
        },
        str(tmp_path / "m.safetensors"),
    )
    view = LazyFP8View(tmp_path, dtype=torch.float32)
    fn, uz = view.get_tensor("fn.weight"), view.get_tensor("uz.weight")
    finite = torch.isfinite(fn) & torch.isfinite(uz) & (codes != 0x80)
    assert torch.equal(uz[finite], fn[finite] / 2)
    assert torch.isnan(uz[0x80]) and fn[0x80].item() == 0.0  # -0 in e4m3fn, NaN in fnuz


def test_include_quant_params(tmp_path):
    t = mixed_tensors()
    save(t, str(tmp_path / "m.safetensors"))
    view = LazyFP8View(tmp_path, block_size=(128, 128), include_quant_params=True)
    assert {"layers.0.q_proj.activation_scale", "layers.0.k_proj.input_scale", "layers.0.k_scale"} <= set(view)
    assert "layers.0.q_proj.weight_scale_inv" not in view
    assert view.get_tensor("layers.0.q_proj.activation_scale").item() == 1.5


def test_compressed_tensors_config_selects_weight_scale(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = fp8_codes((8, 16), E4, 0)
    s = torch.rand(8, 1, generator=g) + 0.5
    save({"l.weight": w, "l.weight_scale": s, "l.input_scale": torch.tensor(2.0)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "config.json").write_text(
        '{"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": '
        '{"weights": {"type": "float", "num_bits": 8, "strategy": "channel"}}}}}'
    )
    view = LazyFP8View(tmp_path)
    assert view.scheme.name == "compressed-tensors" and set(view) == {"l.weight"}
    assert torch.equal(bits(view.get_tensor("l.weight")), bits(reference(w, s, torch.bfloat16)))


def test_declared_scheme_rejects_a_mismatched_scale(tmp_path):
    save({"l.weight": fp8_codes((8, 16), E4, 0), "l.weight_scale_inv": torch.ones(8, 1)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "fp8", "weight_block_size": null}}')
    with pytest.raises(ScaleShapeError, match="scheme 'fp8' expects"):
        LazyFP8View(tmp_path)
    assert LazyFP8View(tmp_path, scheme="per-channel").info("l.weight").granularity == PerChannel()


def test_unsupported_quant_method(tmp_path):
    save({"l.weight": torch.ones(2, 2)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "gptq"}}')
    with pytest.raises(lazyfp8.UnsupportedSchemeError, match="'gptq'"):
        LazyFP8View(tmp_path)
    assert set(LazyFP8View(tmp_path, scheme="auto")) == {"l.weight"}


@pytest.mark.parametrize("shape", [(4, 256, 128), (3, 200, 130), (2, 2, 130, 64)])
def test_fused_experts_are_tiled_matrix_by_matrix(tmp_path, shape):
    # transformers' fused experts: [E, R, C] with a per-expert grid [E, ceil(R/b0), ceil(C/b1)]
    w = torch.randn(shape)
    codes, scale = lazyfp8.quantize(w, PerBlock((128, 128)))
    assert tuple(scale.shape) == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    save({"mlp.experts.gate_up_proj": codes, "mlp.experts.gate_up_proj_scale_inv": scale}, str(tmp_path / "m.safetensors"))
    view = LazyFP8View(tmp_path, block_size=(128, 128), dtype=torch.float32, chunk_elements=5000)
    got = view.get_tensor("mlp.experts.gate_up_proj")
    assert torch.equal(bits(got), bits(reference(codes, scale, torch.float32, (128, 128))))
    per_expert = torch.stack([reference(c, s_, torch.float32, (128, 128)) for c, s_ in zip(codes.reshape(-1, *shape[-2:]), scale.reshape(-1, *scale.shape[-2:]))])
    assert torch.equal(bits(got.reshape(per_expert.shape)), bits(per_expert))
