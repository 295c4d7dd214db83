"""key_mapping="transformers": real transformers 5 MoE model classes (fused experts) strictly loaded
from FP8 checkpoints in their per-expert on-disk layout, bit-exact, expert by expert."""

import json
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lazyfp8 import KeyMappingError, LazyFP8View, PerTensor, init_empty_weights, load_into
from tests.builders import (
    deepseek_config,
    deepseek_v3_checkpoint,
    expected,
    quantize_state_dict,
    unfuse_experts,
    write_checkpoint,
)
from tests.helpers import bits


def fused_expected(quantized, disk, experts_prefix, n, names, block):
    """gate_up_proj / down_proj as transformers fuses them, from each expert's reference
    dequantization."""

    def one(key):
        return expected(*quantized[key], torch.bfloat16, block) if key in quantized else disk[key]

    gate, up, down = names
    gate_up = torch.stack([torch.cat([one(f"{experts_prefix}.{e}.{gate}.weight"), one(f"{experts_prefix}.{e}.{up}.weight")]) for e in range(n)])
    down_ = torch.stack([one(f"{experts_prefix}.{e}.{down}.weight") for e in range(n)])
    return gate_up, down_


def assert_model_matches(model, want):
    sd = model.state_dict()
    assert set(want) <= set(sd)
    for key, value in want.items():
        assert torch.equal(bits(sd[key].to(value.dtype)), bits(value)), key


# --- DeepSeek-V3: dense first layer, MLA, routed + shared experts, 128x128 blocks, ragged edges --


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    cfg = deepseek_config()
    torch.manual_seed(0)
    src = transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
    path = str(tmp_path_factory.mktemp("deepseek_v3"))
    disk, quantized = deepseek_v3_checkpoint(
        path, src.state_dict(), {**cfg.to_dict(), "architectures": ["DeepseekV3ForCausalLM"]}, shards=3
    )
    return path, cfg, disk, quantized


def deepseek_expected(disk, quantized):
    want = {}
    for key, value in disk.items():
        if key.endswith("_scale_inv") or ".mlp.experts." in key:
            continue
        want[key] = expected(*quantized[key], torch.bfloat16, (128, 128)) if key in quantized else value
    gate_up, down = fused_expected(quantized, disk, "model.layers.1.mlp.experts", 4, ("gate_proj", "up_proj", "down_proj"), (128, 128))
    want["model.layers.1.mlp.experts.gate_up_proj"] = gate_up
    want["model.layers.1.mlp.experts.down_proj"] = down
    return want


def test_deepseek_v3_keys_are_the_fused_runtime_model_keys(deepseek):
    path, cfg, _, _ = deepseek
    view = LazyFP8View(path, key_mapping="transformers")
    with init_empty_weights():
        model = transformers.DeepseekV3ForCausalLM(cfg)
    assert set(view) == set(model.state_dict())
    assert view.bytes_read == 0  # all of it from headers
    info = view.info("model.layers.1.mlp.experts.gate_up_proj")
    assert info.shape == (4, 256, 256) and len(info.parts) == 8 and not info.materialized
    assert info.parts[1] == "model.layers.1.mlp.experts.0.up_proj.weight -> [0:1, 128:256, 0:256]"
    with pytest.raises(KeyMappingError, match="several on-disk tensors"):
        view.disk_key("model.layers.1.mlp.experts.down_proj")
    assert view.disk_key("model.layers.0.mlp.gate_proj.weight") == "model.layers.0.mlp.gate_proj.weight"


def test_deepseek_v3_strict_load_state_dict_is_bit_exact(deepseek):
    path, cfg, disk, quantized = deepseek
    model = transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
    result = model.load_state_dict(LazyFP8View(path, key_mapping="transformers"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_model_matches(model, deepseek_expected(disk, quantized))


def test_deepseek_v3_load_into_meta_model_matches_from_pretrained(deepseek):
    path, cfg, disk, quantized = deepseek
    with init_empty_weights():
        model = transformers.DeepseekV3ForCausalLM(cfg)
    model.to(torch.bfloat16)
    load_into(model, path, key_mapping="transformers")
    ours = model.state_dict()
    assert_model_matches(model, deepseek_expected(disk, quantized))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    # transformers scales the ragged rows 96-127 of kv_a_proj_with_mqa with the wrong block row
    # (test_parity_transformers shows it); everywhere else, including the fused experts, the
    # same bits.
    ragged = {f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight" for i in range(2)}
    for key, value in hf.state_dict().items():
        if key not in ragged:
            assert torch.equal(bits(ours[key].to(value.dtype)), bits(value)), key


def test_one_expert_reads_only_its_bytes(deepseek):
    path, _, disk, _ = deepseek
    view = LazyFP8View(path, key_mapping="transformers")
    out = torch.empty(1, 256, 256, dtype=torch.bfloat16)
    view.read_box("model.layers.1.mlp.experts.gate_up_proj", out, (2, 0, 0), (1, 256, 256))
    expert = [f"model.layers.1.mlp.experts.2.{p}_proj.weight{s}" for p in ("gate", "up") for s in ("", "_scale_inv")]
    assert view.bytes_read == sum(disk[k].numel() * disk[k].element_size() for k in expert)
    full = view.get_tensor("model.layers.1.mlp.experts.gate_up_proj")
    assert torch.equal(bits(out), bits(full[2:3]))


def test_a_missing_expert_is_named_before_any_read(deepseek, tmp_path):
    path, _, _, _ = deepseek
    # the same checkpoint without expert 2's up_proj (and its scale)
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    gone = "model.layers.1.mlp.experts.2.up_proj.weight"
    for name in os.listdir(path):
        os.link(os.path.join(path, name), tmp_path / name)
    os.unlink(tmp_path / "model.safetensors.index.json")
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith(gone)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    view = LazyFP8View(tmp_path)  # fine one-to-one
    with pytest.raises(KeyMappingError, match=r"experts\.gate_up_proj.*(missing expert|different expert counts)"):
        LazyFP8View(tmp_path, key_mapping="transformers")
    assert view.bytes_read == 0


# --- Qwen3-MoE: per-tensor scales, every expert a 0-d scale -------------------------------------


def test_qwen3_moe_per_tensor_strict_load(tmp_path):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    torch.manual_seed(1)
    src = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    per_expert = unfuse_experts(src.state_dict())
    select = lambda k: re.match(r"model\.layers\.\d+\.(self_attn|mlp\.experts\.\d+)\.\w+_proj\.weight$", k) is not None  # noqa: E731
    disk, quantized = quantize_state_dict(per_expert, select, PerTensor())
    config = {**cfg.to_dict(), "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": None}}
    write_checkpoint(str(tmp_path), disk, config, shards=2)
    view = LazyFP8View(tmp_path, key_mapping="transformers")
    model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    result = model.load_state_dict(view, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    want = {}
    for i in range(2):
        p = f"model.layers.{i}.mlp.experts"
        want[f"{p}.gate_up_proj"], want[f"{p}.down_proj"] = fused_expected(
            quantized, disk, p, 6, ("gate_proj", "up_proj", "down_proj"), None
        )
        want[f"model.layers.{i}.self_attn.q_proj.weight"] = expected(*quantized[f"model.layers.{i}.self_attn.q_proj.weight"], torch.bfloat16, None)
    assert_model_matches(model, want)


# --- Mixtral: block_sparse_moe renamed to mlp, w1/w3/w2 ------------------------------------------


def mixtral_on_disk(state_dict):
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"^(.*)\.mlp\.experts\.(gate_up_proj|down_proj)$", key)
        if m is None:
            out[key.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = value
            continue
        prefix = m.group(1) + ".block_sparse_moe.experts"
        for e in range(value.shape[0]):
            if m.group(2) == "gate_up_proj":
                w1, w3 = value[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.w1.weight"], out[f"{prefix}.{e}.w3.weight"] = w1.clone(), w3.clone()
            else:
                out[f"{prefix}.{e}.w2.weight"] = value[e].clone()
    return out


def test_mixtral_renames_and_fuses(tmp_path):
    cfg = transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(2)
    src = transformers.MixtralForCausalLM(cfg).to(torch.bfloat16)
    assert "model.layers.0.mlp.gate.weight" in src.state_dict()
    on_disk = mixtral_on_disk(src.state_dict())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in on_disk
    from lazyfp8 import PerBlock

    select = lambda k: re.search(r"(experts\.\d+\.w\d|_proj)\.weight$", k) is not None  # noqa: E731
    disk, quantized = quantize_state_dict(on_disk, select, PerBlock((128, 128)))
    config = {**cfg.to_dict(), "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    write_checkpoint(str(tmp_path), disk, config)
    view = LazyFP8View(tmp_path, key_mapping="transformers")
    with init_empty_weights():
        model = transformers.MixtralForCausalLM(cfg)
    model.to(torch.bfloat16)
    assert set(view) == set(model.state_dict())
    load_into(model, view)
    gate_up, down = fused_expected(quantized, disk, "model.layers.0.block_sparse_moe.experts", 4, ("w1", "w3", "w2"), (128, 128))
    assert_model_matches(model, {"model.layers.0.mlp.experts.gate_up_proj": gate_up, "model.layers.0.mlp.experts.down_proj": down})
    assert torch.equal(bits(model.state_dict()["model.layers.0.mlp.gate.weight"]), bits(disk["model.layers.0.block_sparse_moe.gate.weight"]))


def test_without_model_type_the_error_says_what_is_needed(tmp_path):
    write_checkpoint(str(tmp_path), {"w": torch.zeros(2, 2)}, {"architectures": ["X"]})
    with pytest.raises(KeyMappingError, match="model_type"):
        LazyFP8View(tmp_path, key_mapping="transformers")


def test_a_view_under_transformers_mapping_pickles_and_remaps(deepseek):
    import pickle

    path, _, _, _ = deepseek
    view = LazyFP8View(path, key_mapping="transformers")
    again = pickle.loads(pickle.dumps(view))
    key = "model.layers.1.mlp.experts.down_proj"
    assert key in again and torch.equal(bits(again.get_tensor(key)), bits(view.get_tensor(key)))
    plain = view.remap(None)
    assert key not in plain and "model.layers.1.mlp.experts.0.down_proj.weight" in plain


# --- distributed: fused parameters sharded as DTensors read only their experts / rows ----------

FUSED = "model.layers.1.mlp.experts.gate_up_proj"


def _rank(rank, world, store, path, out):
    import datetime

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Shard, empty, init_device_mesh

    from lazyfp8 import LazyFP8StorageReader

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (world,))
        records = {}
        for dim in (0, 1):
            view = LazyFP8View(path, key_mapping="transformers")
            dt = empty((4, 256, 256), dtype=torch.bfloat16, device_mesh=mesh, placements=[Shard(dim)])
            dt.copy_(view[FUSED])
            records[f"copy{dim}"] = (dt.to_local().clone(), view.bytes_read)
            reader = LazyFP8StorageReader(path, key_mapping="transformers")
            dt = empty((4, 256, 256), dtype=torch.bfloat16, device_mesh=mesh, placements=[Shard(dim)])
            dcp.load({FUSED: dt}, storage_reader=reader)
            records[f"dcp{dim}"] = (dt.to_local().clone(), reader.view.bytes_read)
        torch.save(records, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_and_row_sharded_fused_parameters_read_only_their_box(deepseek, tmp_path, world):
    import math
    import multiprocessing

    path, _, disk, _ = deepseek
    full = LazyFP8View(path, key_mapping="transformers").get_tensor(FUSED)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, world, str(tmp_path / "store"), path, str(tmp_path / f"r{r}.pt"))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    def stored_bytes(key, rows):
        # the box's codes, and the whole scale of an FP8 tensor the box meets (read once)
        codes, scale = disk[key], disk[key + "_scale_inv"]
        return rows * codes.shape[1] * codes.element_size() + scale.numel() * scale.element_size()

    for r in range(world):
        records = torch.load(tmp_path / f"r{r}.pt")
        for how in ("copy", "dcp"):
            for dim in (0, 1):
                local, nbytes = records[f"{how}{dim}"]
                size = math.ceil(full.shape[dim] / world)
                lo, hi = r * size, min((r + 1) * size, full.shape[dim])
                want = full.narrow(dim, lo, hi - lo)
                assert torch.equal(bits(local), bits(want)), (r, how, dim)
                prefix = "model.layers.1.mlp.experts"
                if dim == 0:  # whole experts lo..hi
                    expect = sum(stored_bytes(f"{prefix}.{e}.{p}_proj.weight", 128) for e in range(lo, hi) for p in ("gate", "up"))
                else:  # rows lo..hi of every expert: gate rows below 128, up rows above
                    expect = 0
                    for e in range(4):
                        for part, (a, b) in (("gate", (0, 128)), ("up", (128, 256))):
                            rows = max(0, min(hi, b) - max(lo, a))
                            expect += stored_bytes(f"{prefix}.{e}.{part}_proj.weight", rows) if rows else 0
                assert nbytes == expect, (r, how, dim, nbytes, expect)


def test_load_into_auto_finds_transformers_mapping_for_a_transformers_model(deepseek, caplog):
    import logging

    path, cfg, disk, quantized = deepseek
    with init_empty_weights():
        model = transformers.DeepseekV3ForCausalLM(cfg)
    model.to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="lazyfp8"):
        result = load_into(model, path, key_mapping="auto")
    assert not result.missing_keys and not result.unexpected_keys
    assert "transformers' conversion mapping" in caplog.text
    assert_model_matches(model, deepseek_expected(disk, quantized))


def test_load_into_auto_keeps_prefix_inference_for_other_models(tmp_path):
    from torch import nn

    write_checkpoint(str(tmp_path), {"backbone.lin.weight": torch.ones(2, 2, dtype=torch.bfloat16)})
    model = nn.Module()
    model.lin = nn.Linear(2, 2, bias=False, dtype=torch.bfloat16)
    load_into(model, tmp_path, key_mapping="auto")
    assert torch.equal(model.lin.weight, torch.ones(2, 2, dtype=torch.bfloat16))


# --- operations: transformers' own op is the oracle; an op that is not a layout is materialized ---


def test_interleave_chunk_and_a_non_layout_op_against_transformers_own_ops(tmp_path):
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import Chunk, ConversionOps, Interleave, WeightConverter

    class Doubled(ConversionOps):
        """Not a layout: the values change."""

        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            (value,) = input_dict.values()
            value = value[0] if isinstance(value, list) else value
            return {target_patterns[0]: value * 2}

        @property
        def reverse_op(self):
            return self

    model_type = "lazyfp8_test_ops"
    register_checkpoint_conversion_mapping(
        model_type,
        [
            WeightConverter("mlp.w13_dn.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"], operations=[Interleave(dim=0), Chunk(dim=0)]),
            WeightConverter("mlp.experts.w13_weight", "mlp.experts.gate_up_proj", operations=[Interleave(dim=1)]),
            WeightConverter("mlp.scaled.weight", "mlp.doubled.weight", operations=[Doubled()]),
        ],
        overwrite=True,
    )
    g = torch.Generator().manual_seed(3)
    tensors = {
        "model.mlp.w13_dn.weight": torch.randn(8, 5, generator=g).to(torch.bfloat16),
        "model.mlp.experts.w13_weight": torch.randn(3, 6, 4, generator=g).to(torch.bfloat16),
        "model.mlp.scaled.weight": torch.randn(2, 2, generator=g).to(torch.bfloat16),
    }
    write_checkpoint(str(tmp_path), tensors, {"model_type": model_type})
    view = LazyFP8View(tmp_path, key_mapping="transformers")
    assert set(view) == {"model.mlp.gate_proj.weight", "model.mlp.up_proj.weight", "model.mlp.experts.gate_up_proj", "model.mlp.doubled.weight"}
    gate, up = Chunk(dim=0).convert(
        Interleave(dim=0).convert({"w": tensors["model.mlp.w13_dn.weight"]}, ["w"], ["w"]), ["w"], ["gate", "up"]
    ).values()
    fused = Interleave(dim=1).convert({"w": tensors["model.mlp.experts.w13_weight"]}, ["w"], ["w"])["w"]
    assert torch.equal(view.get_tensor("model.mlp.gate_proj.weight"), gate)
    assert torch.equal(view.get_tensor("model.mlp.up_proj.weight"), up)
    assert torch.equal(view.get_tensor("model.mlp.experts.gate_up_proj"), fused)
    box = torch.empty(3, 2, 4, dtype=torch.bfloat16)  # a box of the interleaved rows
    assert torch.equal(view.read_box("model.mlp.experts.gate_up_proj", box, (0, 1, 0), (3, 2, 4)), fused[:, 1:3])
    # the op that is not a layout: materialized, named, and equal to transformers' own result
    assert view.materialized == ["model.mlp.doubled.weight"]
    info = view.info("model.mlp.doubled.weight")
    assert info.materialized and "Doubled is not a layout" in info.parts[0]
    assert not view.info("model.mlp.experts.gate_up_proj").materialized
    assert torch.equal(view.get_tensor("model.mlp.doubled.weight"), tensors["model.mlp.scaled.weight"] * 2)
    assert view["model.mlp.doubled.weight"].shape == (2, 2)


def test_inspect_shows_composites_from_headers_alone(deepseek, capsys):
    from lazyfp8.cli import main
    from lazyfp8.inspection import inspect_checkpoint

    path, _, _, _ = deepseek
    report = inspect_checkpoint(path, key_mapping="transformers")
    assert not report.problems
    parts = report.composites["model.layers.1.mlp.experts.gate_up_proj"]
    assert len(parts) == 8 and parts[0] == "model.layers.1.mlp.experts.0.gate_proj.weight -> [0:1, 0:128, 0:256]"
    assert report.runtime_names["model.layers.0.mlp.gate_proj.weight"] == "model.layers.0.mlp.gate_proj.weight"
    assert main(["inspect", path, "--key-mapping", "transformers"]) == 0
    out = capsys.readouterr().out
    assert "composite keys (several on-disk tensors each): 2" in out
    assert "model.layers.1.mlp.experts.down_proj <- 4 part(s)" in out


def test_mx_scales_inside_fused_experts(tmp_path):
    """ue8m0 1x32 blocks (MX) per expert, fused by transformers' mapping: each slice is that
    expert's reference dequantization."""
    from lazyfp8 import PerBlock
    from tests.builders import mx_config

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        num_experts=3, num_experts_per_tok=1, decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    torch.manual_seed(4)
    src = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    per_expert = unfuse_experts(src.state_dict())
    select = lambda k: ".mlp.experts." in k  # noqa: E731
    disk, quantized = quantize_state_dict(per_expert, select, PerBlock((1, 32)), scale_dtype=torch.uint8)
    write_checkpoint(str(tmp_path), disk, mx_config(cfg.to_dict()))
    view = LazyFP8View(tmp_path, key_mapping="transformers")
    gate_up, down = fused_expected(quantized, disk, "model.layers.0.mlp.experts", 3, ("gate_proj", "up_proj", "down_proj"), (1, 32))
    assert torch.equal(bits(view.get_tensor("model.layers.0.mlp.experts.gate_up_proj")), bits(gate_up))
    assert torch.equal(bits(view.get_tensor("model.layers.0.mlp.experts.down_proj")), bits(down))
