import json
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

import lazyfp8
from lazyfp8 import (
    LazyFP8View,
    NonFiniteError,
    PerBlock,
    PerChannel,
    PerTensor,
    init_empty_weights,
    load_into,
    save,
)
from lazyfp8.keymap import KeyMappingError
from tests.helpers import bits, reference
from tests.strategies import key_trees, random_tensor


def raw(path, key):
    """The stored tensor, straight from safetensors."""
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    for f in files:
        with safe_open(os.path.join(path, f), "pt") as h:
            if key in h.keys():
                return h.get_tensor(key)
    raise KeyError(key)


class Net(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.embed = nn.Embedding(40, 64)
        self.up = nn.Linear(64, 300)
        self.down = nn.Linear(300, 64, bias=False)
        self.norm = nn.LayerNorm(64)
        self.lm_head = nn.Linear(64, 40, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight


def test_model_round_trip_and_ties(tmp_path):
    torch.manual_seed(0)
    src = Net().to(torch.bfloat16)
    r = save(src, tmp_path, scheme=PerBlock((128, 128)), config={"model_type": "net"})
    assert r.quantized == ["up.weight", "down.weight"]  # Linear weights; the head is excluded
    assert r.tied == ["lm_head.weight"]
    view = LazyFP8View(tmp_path)
    assert "lm_head.weight" not in view and set(view) == set(src.state_dict()) - {"lm_head.weight"}
    assert view.scheme.name == "fp8" and view.info("up.weight").granularity == PerBlock((128, 128))
    with init_empty_weights():
        dst = Net().to(torch.bfloat16)
    load_into(dst, view)
    assert dst.lm_head.weight is dst.embed.weight
    for k in ["embed.weight", "norm.weight", "up.bias"]:
        assert torch.equal(bits(dst.state_dict()[k]), bits(src.state_dict()[k]))
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]


def test_single_file_without_index(tmp_path):
    r = save({"a.weight": torch.randn(4, 4)}, tmp_path)
    assert r.files == ["model.safetensors"] and r.index is None
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


SCHEMES = st.one_of(
    st.just(PerTensor()),
    st.just(PerChannel()),
    st.tuples(st.integers(1, 64), st.integers(1, 64)).map(PerBlock),
)
SHAPES = st.one_of(
    st.tuples(st.integers(0, 40), st.integers(0, 40)),
    st.tuples(st.integers(1, 150), st.integers(1, 150)),
    st.tuples(st.integers(0, 50)),
)


@given(
    keys=key_trees(min_size=1, max_size=6),
    data=st.data(),
    scheme=SCHEMES,
    fp8=st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]),
    shard_size=st.integers(1, 20_000),
    prefix=st.sampled_from(["", "model.", "language_model.model."]),
)
def test_property_save_then_view(tmp_path_factory, keys, data, scheme, fp8, shard_size, prefix):
    d = str(tmp_path_factory.mktemp("w"))
    sd = {}
    for i, k in enumerate(keys):
        shape = data.draw(SHAPES)
        dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float32, torch.float16, torch.int64]))
        sd[k] = random_tensor(shape, dtype, i)
    mapping = {"^" + prefix.replace(".", r"\."): ""} if prefix else None
    fmt = "compressed-tensors" if isinstance(scheme, PerChannel) else "fp8"
    quantize = lambda key: sd[key].dim() == 2  # noqa: E731
    r = save(sd, d, scheme=scheme, fp8_dtype=fp8, key_mapping=mapping, quantize=quantize, exclude=(), max_shard_size=shard_size, format=fmt)
    view = LazyFP8View(d, key_mapping=mapping, block_size=getattr(scheme, "block", None), dtype=torch.float32)
    assert set(view) == set(sd)
    for k, t in sd.items():
        got = view.get_tensor(k)
        if k in r.quantized:
            scale = view.scale(k)
            block = view.info(k).granularity.block_size(t.shape)
            codes = raw(d, view.disk_key(k))
            assert torch.equal(bits(got), bits(reference(codes, scale, torch.float32, block)))
            # within half an fp8 step of each value (relative), or of the smallest subnormal step
            step = 2.0 ** -(4 if fp8 == torch.float8_e4m3fn else 3)
            tiny = reference(torch.ones_like(codes, dtype=torch.float32).to(fp8), scale, torch.float32, block) * 2.0**-9
            err = (got - t.float()).abs()
            assert (err <= torch.maximum(t.float().abs() * step, tiny) * 1.0001).all()
            again, _ = lazyfp8.quantize(got, view.info(k).granularity, fp8, scale=scale)
            assert torch.equal(bits(again), bits(codes)), "re-quantizing gives the same bytes"
        else:
            assert got.dtype == t.dtype and torch.equal(bits(got), bits(t))
        assert view.disk_key(k) == prefix + k
    if len(r.files) > 1:
        index = json.loads(open(os.path.join(d, r.index)).read())
        assert set(index["weight_map"].values()) == set(r.files)


def test_resave_of_a_view_reproduces_the_fp8_bytes(tmp_path):
    torch.manual_seed(1)
    src = Net(tie=False).to(torch.bfloat16)
    for scheme in [PerTensor(), PerBlock((128, 128)), PerBlock((1, 32))]:
        a, b = tmp_path / f"a{scheme}", tmp_path / f"b{scheme}"
        save(src, a, scheme=scheme)
        view = LazyFP8View(a, block_size=getattr(scheme, "block", None))
        r = save(view, b, scheme=scheme, scales=view, quantize=lambda k, v=view: v.info(k).scale_key is not None)
        assert sorted(r.quantized) == ["down.weight", "up.weight"]
        for k in r.quantized:
            assert torch.equal(bits(raw(a, k)), bits(raw(b, k)))
            assert torch.equal(bits(raw(a, k + "_scale_inv")), bits(raw(b, k + "_scale_inv")))


def test_ue8m0_writes_exponent_bytes(tmp_path):
    save({"x.weight": torch.randn(8, 64)}, tmp_path, scheme="mx", ue8m0=True)
    assert raw(tmp_path, "x.weight_scale_inv").dtype == torch.uint8
    view = LazyFP8View(tmp_path)
    assert view.info("x.weight").granularity == PerBlock((1, 32))


def test_compressed_tensors_format(tmp_path):
    save({"l.weight": torch.randn(8, 16)}, tmp_path, scheme=PerChannel(), format="compressed-tensors", config={})
    view = LazyFP8View(tmp_path)
    assert view.scheme.name == "compressed-tensors" and view.info("l.weight").scale_key == "l.weight_scale"


def test_incompatible_format(tmp_path):
    with pytest.raises(ValueError, match="no per-channel"):
        save({"l.weight": torch.randn(8, 16)}, tmp_path, scheme=PerChannel())


def test_nan_input_names_the_tensor_and_leaves_nothing(tmp_path):
    sd = {f"l{i}.weight": torch.randn(64, 64) for i in range(4)}
    sd["l3.weight"][5, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="'l3.weight'"):
        save(sd, tmp_path, max_shard_size=10_000)
    assert os.listdir(tmp_path) == []


def test_failure_midway_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    calls = []
    real = lazyfp8.writer._save_file

    def flaky(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real(tensors, path)

    monkeypatch.setattr(lazyfp8.writer, "_save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        save({f"l{i}.weight": torch.randn(64, 64) for i in range(5)}, tmp_path, max_shard_size=10_000, config={})
    assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite_then_replaces_and_cleans_stale_shards(tmp_path):
    sd = {f"l{i}.weight": torch.randn(64, 64) for i in range(5)}
    first = save(sd, tmp_path, scheme=None, max_shard_size=10_000)
    assert len(first.files) == 5
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(sd, tmp_path)
    second = save(sd, tmp_path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"] and second.index is None
    assert set(LazyFP8View(tmp_path)) == set(sd)


def test_key_mapping_that_does_not_invert(tmp_path):
    with pytest.raises(KeyMappingError, match="cannot be inverted"):
        save({"model.layers.0.w": torch.ones(2)}, tmp_path, key_mapping={r"^layers\.(\d+)": r"model.layers.\1"})
    with pytest.raises(KeyMappingError, match="reads back"):
        save({"new.w": torch.ones(2), "old.w": torch.ones(2)}, tmp_path, key_mapping={r"^old\.": "new."})


def test_streams_one_tensor_at_a_time_from_a_view(tmp_path, monkeypatch):
    sd = {f"l{i}.weight": torch.randn(64, 64).to(torch.bfloat16) for i in range(6)}
    save(sd, tmp_path / "src", scheme=None)
    view = LazyFP8View(tmp_path / "src")
    events = []
    real_mat = lazyfp8.LazyTensor.materialize
    monkeypatch.setattr(lazyfp8.LazyTensor, "materialize", lambda self: (events.append(("read", self.key)), real_mat(self))[1])
    real_save = lazyfp8.writer._save_file
    monkeypatch.setattr(lazyfp8.writer, "_save_file", lambda t, p: (events.append(("write", sorted(t))), real_save(t, p))[1])
    r = save(view, tmp_path / "dst", scheme=None, max_shard_size=2 * 64 * 64 * 2)
    assert len(r.files) == 3
    # each shard is written before the next shard's tensors are read
    kinds = [e[0] for e in events]
    assert kinds == ["read", "read", "write"] * 3


def test_files_get_the_usual_permissions(tmp_path):
    # safetensors writes 0600; a checkpoint must be as readable as any file the user creates
    old = os.umask(0o022)
    try:
        save({"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64, 64)}, tmp_path, max_shard_size=5000, config={})
    finally:
        os.umask(old)
    modes = {f: os.stat(tmp_path / f).st_mode & 0o777 for f in os.listdir(tmp_path)}
    assert set(modes.values()) == {0o644}, modes


def test_an_unwritable_config_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(lazyfp8.writer, "_materialize", lambda v: pytest.fail("read a tensor"))
    with pytest.raises(ValueError, match="ue8m0"):
        save({"x.weight": torch.randn(8, 64)}, tmp_path, scheme="mx", ue8m0=True, config={})
    with pytest.raises(ValueError, match="format must be one of"):
        save({"x.weight": torch.randn(8, 64)}, tmp_path, scheme=None, format="gguf")
    assert os.listdir(tmp_path) == []


def test_empty_block_scaled_weight_round_trips(tmp_path):
    # Found by the property test above: a [0, 3] weight with 1 x 2 blocks has a [0, 2] grid.
    save({"w": torch.randn(0, 3)}, tmp_path, scheme=PerBlock((1, 2)), quantize=lambda k: True, exclude=())
    view = LazyFP8View(tmp_path, block_size=(1, 2), dtype=torch.float32)
    codes = raw(str(tmp_path), "w")
    assert view.get_tensor("w").shape == (0, 3) and tuple(view.scale("w").shape) == (0, 2)
    assert reference(codes, view.scale("w"), torch.float32, (1, 2)).shape == (0, 3)
