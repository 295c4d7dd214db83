import copy
import gc
import multiprocessing
import os
import pickle
import re
import time

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
from tests.helpers import ViewDataset, bits, raw_file, reference, save, write_sharded
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
    monkeypatch.setattr(lazyfp8.storage.reader.ShardFile, "read_into", lambda *a: pytest.fail("read data"))
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
    # Written by hand: safetensors writes F8_E4M3FNUZ only from 0.8 on, and our floor is older.
    one = torch.tensor(1.0).numpy().tobytes()
    raw_file(
        str(tmp_path / "m.safetensors"),
        {
            "fn.weight": {"dtype": "F8_E4M3", "shape": [256], "data_offsets": [0, 256]},
            "fn.weight_scale_inv": {"dtype": "F32", "shape": [], "data_offsets": [256, 260]},
            "uz.weight": {"dtype": "F8_E4M3FNUZ", "shape": [256], "data_offsets": [260, 516]},
            "uz.weight_scale_inv": {"dtype": "F32", "shape": [], "data_offsets": [516, 520]},
        },
        codes.numpy().tobytes() + one + codes.numpy().tobytes() + one,
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


def test_declared_scheme_reads_a_scale_by_the_one_granularity_its_shape_fits(tmp_path):
    # The config says per-tensor; a [rows, 1] scale fits only per-channel, so it is per-channel
    # (issue 14's rule, as transformers reads it). A shape no granularity fits stays an error.
    save({"l.weight": fp8_codes((8, 16), E4, 0), "l.weight_scale_inv": torch.ones(8, 1)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "fp8", "weight_block_size": null}}')
    assert LazyFP8View(tmp_path).info("l.weight").granularity == PerChannel()
    save({"l.weight": fp8_codes((8, 16), E4, 0), "l.weight_scale_inv": torch.ones(3, 5)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ScaleShapeError, match=r"scheme 'fp8' expects"):
        LazyFP8View(tmp_path)
    with pytest.raises(ScaleShapeError):
        LazyFP8View(tmp_path, scheme="per-channel")


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


# --- misses on a large checkpoint ---------------------------------------------------------------
@pytest.fixture(scope="module")
def keys_50k(tmp_path_factory):
    """50,000 tiny tensors in one file: the key count of a large MoE checkpoint."""
    path = tmp_path_factory.mktemp("keys50k")
    keys = [f"model.layers.{i}.mlp.experts.{j}.down_proj.weight" for i in range(100) for j in range(500)]
    save({k: torch.zeros(1, dtype=torch.bfloat16) for k in keys}, str(path / "model.safetensors"))
    return LazyFP8View(path)


def test_a_miss_on_50k_keys_is_cheap(keys_50k):
    view = keys_50k
    with pytest.raises(TensorNotFoundError):
        view["not.a.key"]  # the first miss may build the hint's index
    best = float("inf")
    for _ in range(3):  # the best of three: a shared CI machine may stall any one run
        start = time.perf_counter()
        for i in range(100):
            with pytest.raises(TensorNotFoundError):
                view[f"model.layers.{i}.mlp.experts.{i}.up_proj.weight"]
            if time.perf_counter() - start > 0.05:
                break  # over budget already (difflib over every key took 2.5 s per miss)
        best = min(best, time.perf_counter() - start)
    assert best < 0.05, f"100 misses took {best * 1000:.0f} ms"


def test_get_and_in_never_build_a_hint(keys_50k, monkeypatch):
    def no_hint(self, key):
        raise AssertionError(f"a hint was built for {key!r}")

    monkeypatch.setattr(LazyFP8View, "_missing", no_hint)
    assert keys_50k.get("nope") is None
    assert keys_50k.get("nope", 7) == 7
    assert "nope" not in keys_50k
    assert keys_50k.get("model.layers.0.mlp.experts.0.down_proj.weight").shape == (1,)


@pytest.mark.parametrize(
    "typo, meant",
    [
        ("language_model.layers.3.mlp.experts.7.down_proj.weight", "model.layers.3.mlp.experts.7.down_proj.weight"),
        ("layers.3.mlp.experts.7.down_proj.weight", "model.layers.3.mlp.experts.7.down_proj.weight"),
        ("model.layers.3.mlp.experts.7.down_proj.weights", "model.layers.3.mlp.experts.7.down_proj.weight"),
        ("model.layers.3.mlp.experts.7.down_proj", "model.layers.3.mlp.experts.7.down_proj.weight"),
        ("model.layers.3.mlp.experts.7.down.weight", "model.layers.3.mlp.experts.7.down_proj.weight"),
    ],
    ids=["prefix-changed", "prefix-dropped", "suffix-changed", "suffix-dropped", "middle"],
)
def test_the_hint_finds_near_misses_among_50k_keys(keys_50k, typo, meant):
    with pytest.raises(TensorNotFoundError, match=f"did you mean {meant!r}"):
        keys_50k[typo]


# --- pickling and copying -------------------------------------------------------------------------
def assert_same_values(a, b):
    assert list(a) == list(b)
    for k in a:
        x, y = a.get_tensor(k), b.get_tensor(k)
        assert x.dtype == y.dtype and torch.equal(bits(x), bits(y)), k


def test_pickle_round_trip_reopens_with_the_same_arguments(mixed):
    path, _ = mixed
    view = LazyFP8View(
        path, dtype=torch.float16, block_size=(128, 128), include_quant_params=True, chunk_elements=999, threads=3
    )
    view.get_tensor("layers.0.mlp.weight")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy_ = pickle.loads(pickle.dumps(view, protocol))
        assert copy_ is not view and copy_.path == view.path and copy_.bytes_read == 0
        assert (copy_.dtype, copy_.device, copy_.scheme) == (view.dtype, view.device, view.scheme)
        assert (copy_._chunk, copy_._threads) == (999, 3)
        assert_same_values(view, copy_)
    remapped = view.remap({r"^layers\.": "model.layers."})
    again = pickle.loads(pickle.dumps(remapped))
    assert "model.layers.0.mlp.weight" in again and again.disk_key("model.layers.0.mlp.weight") == "layers.0.mlp.weight"
    assert_same_values(remapped, again)


def test_pickle_of_a_changed_or_removed_checkpoint_names_the_file(mixed):
    path, _ = mixed
    view = LazyFP8View(path, block_size=(128, 128))
    data = pickle.dumps(view)
    shard = view.info("bias").file
    stat = os.stat(shard)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place, say
    with pytest.raises(CheckpointError, match=re.escape(shard)):
        pickle.loads(data)
    os.remove(shard)
    with pytest.raises(CheckpointError, match=re.escape(os.path.basename(shard))):
        pickle.loads(data)


def test_copy_shares_the_headers_and_deepcopy_reopens(mixed, monkeypatch):
    path, _ = mixed
    view = LazyFP8View(path, block_size=(128, 128), key_mapping={r"^layers\.": "model.layers."})
    deep = copy.deepcopy(view)
    assert deep._files is not view._files and list(deep) == list(view)
    assert_same_values(view, deep)
    monkeypatch.setattr("lazyfp8.view.open_checkpoint", lambda *a: pytest.fail("copy.copy read headers"))
    shallow = copy.copy(view)
    assert shallow._files is view._files
    assert_same_values(view, shallow)


def test_spawn_pool_reads_through_pickled_views(mixed):
    """The spawn start method: each worker gets the view by pickle and opens it again."""
    path, _ = mixed
    view = LazyFP8View(path, block_size=(128, 128), threads=2, chunk_elements=1000)
    keys = list(view)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        got = pool.map_async(view.get_tensor, keys).get(timeout=300)
    for k, t in zip(keys, got):
        assert torch.equal(bits(t), bits(view.get_tensor(k))), k


def test_spawn_dataloader_workers(mixed):
    path, _ = mixed
    view = LazyFP8View(path, block_size=(128, 128), threads=2, chunk_elements=1000)
    loader = torch.utils.data.DataLoader(
        ViewDataset(view), batch_size=None, num_workers=2, multiprocessing_context="spawn", timeout=300
    )
    got = dict(loader)
    assert sorted(got) == sorted(view)
    for k, t in got.items():
        assert torch.equal(bits(t), bits(view.get_tensor(k))), k


def test_a_pickled_view_holds_its_arguments_not_its_catalogue(keys_50k, monkeypatch):
    """Pickled as what opened it, a view of 50k keys is a few hundred bytes, and unpickling reads
    the headers again (which validates the files) rather than trusting a stale copy of them."""
    data = pickle.dumps(keys_50k)
    assert len(data) < 2000
    opened = []
    real = lazyfp8.view.open_checkpoint
    monkeypatch.setattr(lazyfp8.view, "open_checkpoint", lambda *a: opened.append(a) or real(*a))
    assert len(pickle.loads(data)) == 50_000 and len(opened) == 1
