import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import lazyfp8
from lazyfp8 import PRESETS, Fuse, KeyMapping, KeyMappingError, Rule, Split, prefix_rule
from tests.strategies import key_trees

MISTRAL3 = {
    "language_model.model.layers.0.self_attn.q_proj.weight": "model.language_model.layers.0.self_attn.q_proj.weight",
    "language_model.model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
    "language_model.model.norm.weight": "model.language_model.norm.weight",
    "language_model.lm_head.weight": "lm_head.weight",
    "vision_tower.transformer.layers.0.attention.q_proj.weight": "model.vision_tower.transformer.layers.0.attention.q_proj.weight",
    "multi_modal_projector.linear_1.weight": "model.multi_modal_projector.linear_1.weight",
}


def test_mistral3_preset():
    km = KeyMapping.from_spec("mistral3")
    for disk, runtime in MISTRAL3.items():
        assert km.to_runtime(disk) == runtime
    assert km.build(MISTRAL3) == {v: k for k, v in MISTRAL3.items()}


def test_identity_and_unmatched_keys_keep_their_name():
    assert KeyMapping.from_spec(None).to_runtime("a.b") == "a.b"
    assert KeyMapping.from_spec("mistral3").to_runtime("other.weight") == "other.weight"


def test_first_matching_rule_wins_and_replaces_once():
    km = KeyMapping.from_spec({r"a": "b", r"^b": "c"})
    assert km.to_runtime("a.a") == "b.a"  # first rule, first occurrence only
    assert km.to_runtime("b.x") == "c.x"


def test_backreferences():
    km = KeyMapping.from_spec({r"^layers\.(\d+)\.": r"model.layers.\1."})
    assert km.to_runtime("layers.12.w") == "model.layers.12.w"


def test_collision_names_both_keys():
    km = KeyMapping.from_spec({r"^(x|y)\.": "z."})
    with pytest.raises(KeyMappingError, match="'x.w' and 'y.w' to 'z.w'"):
        km.build(["x.w", "y.w"])


def test_collision_with_an_unmapped_key():
    km = KeyMapping.from_spec({r"^old\.": "new."})
    with pytest.raises(KeyMappingError, match="'new.w' and 'old.w'"):
        km.build(["new.w", "old.w"])


@pytest.mark.parametrize("spec", [[("a",)], [3], {"a": 3}])
def test_malformed_specs(spec):
    with pytest.raises(KeyMappingError):
        KeyMapping.from_spec(spec)


def test_bad_regex():
    with pytest.raises(KeyMappingError, match="not a valid regex"):
        Rule("(", "x")


def test_unknown_preset_lists_presets():
    with pytest.raises(KeyMappingError, match="mistral3"):
        KeyMapping.from_spec("nope")
    assert "mistral3" in PRESETS


@given(key_trees(), st.sampled_from(["model.", "x.y.", "language_model.model."]))
def test_prefix_rules_are_one_to_one_over_any_key_set(keys, prefix):
    km = KeyMapping((prefix_rule("", prefix),))
    table = km.build(keys)
    assert sorted(table.values()) == sorted(keys)
    assert all(r == prefix + d for r, d in table.items())


@given(key_trees())
def test_mistral3_is_one_to_one_on_any_prefixed_tree(keys):
    disk = [p + k for k in keys for p in ("language_model.model.", "vision_tower.", "multi_modal_projector.")]
    table = KeyMapping.from_spec("mistral3").build(disk)
    assert len(table) == len(disk) and sorted(table.values()) == sorted(disk)


def test_preset_inverts():
    km = KeyMapping.from_spec("mistral3")
    for disk, runtime in MISTRAL3.items():
        assert km.to_disk(runtime) == disk
    assert km.build_inverse(MISTRAL3.values()) == MISTRAL3


def test_transformers_style_unescaped_dots_invert():
    km = KeyMapping.from_spec({r"^language_model.model": "model.language_model"})
    assert km.to_disk("model.language_model.norm.weight") == "language_model.model.norm.weight"


def test_non_literal_rule_needs_an_explicit_inverse():
    km = KeyMapping.from_spec({r"^layers\.(\d+)\.": r"model.layers.\1."})
    with pytest.raises(KeyMappingError, match="cannot be inverted automatically"):
        km.to_disk("model.layers.1.w")
    explicit = KeyMapping(km.rules, inverse=(Rule(r"^model\.layers\.(\d+)\.", r"layers.\1."),))
    assert explicit.build_inverse(["model.layers.3.w"]) == {"layers.3.w": "model.layers.3.w"}


def test_inverse_that_does_not_round_trip_names_the_key():
    # "new.x" is written as "old.x" ... which is also how the unmapped runtime key "old.x" is written.
    km = KeyMapping.from_spec({r"^old\.": "new."})
    with pytest.raises(KeyMappingError, match="'old.x'.*reads back as 'new.x'"):
        km.build_inverse(["new.x", "old.x"])


PREFIXES = st.sampled_from(["", "model.", "language_model.model.", "a.", "a.b.", "vision_tower."])


@given(key_trees(), st.lists(st.tuples(PREFIXES, PREFIXES), min_size=0, max_size=4))
def test_round_trip_or_a_named_error(keys, pairs):
    """For any prefix rule set, over any key set: either both directions round-trip on every key,
    or building the mapping fails with an error that names keys; never a silent loss."""
    rules = tuple(prefix_rule(d, r) for d, r in pairs)
    km = KeyMapping(rules)
    disk_keys = [d + k for d, _ in (pairs or [("", "")]) for k in keys]
    disk_keys = list(dict.fromkeys(disk_keys))
    try:
        forward = km.bijection(disk_keys)
        backward = km.build_inverse(forward)
    except KeyMappingError as e:
        assert "'" in str(e)  # names at least one key
        return
    assert backward == {d: r for r, d in forward.items()}
    for r, d in forward.items():
        assert km.to_runtime(km.to_disk(r)) == r and km.to_disk(km.to_runtime(d)) == d


def test_infer_finds_the_mistral3_rules():
    inferred = KeyMapping.infer(MISTRAL3.keys(), MISTRAL3.values())
    assert inferred.build(MISTRAL3) == {v: k for k, v in MISTRAL3.items()}
    assert set(inferred.rules) == set(PRESETS["mistral3"])


def test_infer_identity_when_names_match():
    assert KeyMapping.infer(["a.w", "b.w"], ["a.w", "b.w"]).rules == ()


def test_infer_fails_clearly():
    with pytest.raises(KeyMappingError, match="match no model key.*'zzz.q'"):
        KeyMapping.infer(["zzz.q"], ["a.w"])
    with pytest.raises(KeyMappingError, match="several model keys"):
        KeyMapping.infer(["x.w"], ["a.x.w", "b.x.w"])


@given(key_trees(min_size=2), st.sampled_from(["model.", "transformer.", "a.b."]))
def test_infer_recovers_a_prefix_from_any_tree(keys, prefix):
    runtime = [prefix + k for k in keys]
    inferred = KeyMapping.infer(keys, runtime)
    assert inferred.build(keys) == dict(zip(runtime, keys))


# --- composite rules: Fuse and Split, read and written ------------------------------------------


EXPERTS = [
    lazyfp8.prefix_rule("model.", ""),
    Fuse(["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"], "mlp.experts.gate_up_proj", stack_dim=0, cat_dim=1),
    Fuse(["mlp.experts.*.down_proj.weight"], "mlp.experts.down_proj", stack_dim=0),
]


def stored_keys(path):
    keys = set()
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                keys |= set(f.keys())
    return keys


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 5), st.integers(1, 2), st.integers(0, 2**31 - 1))
def test_fused_experts_round_trip_through_their_per_expert_layout(experts, inter, hidden, layers, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        sd[f"layers.{i}.mlp.experts.gate_up_proj"] = torch.randn(experts, 2 * inter, hidden, generator=g).to(torch.bfloat16)
        sd[f"layers.{i}.mlp.experts.down_proj"] = torch.randn(experts, hidden, inter, generator=g).to(torch.bfloat16)
        sd[f"layers.{i}.norm.weight"] = torch.randn(hidden, generator=g).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as d:
        lazyfp8.save(sd, d, key_mapping=EXPERTS, scheme=None, max_shard_size=max(64, experts * inter * hidden * 4))
        on_disk = stored_keys(d)
        assert on_disk == {
            f"model.layers.{i}.{k}"
            for i in range(layers)
            for k in ["norm.weight", *(f"mlp.experts.{e}.{p}_proj.weight" for e in range(experts) for p in ("gate", "up", "down"))]
        }
        view = lazyfp8.LazyFP8View(d, key_mapping=EXPERTS)
        assert set(view) == set(sd)
        for key, value in sd.items():
            assert torch.equal(view.get_tensor(key).view(torch.int16), value.view(torch.int16)), key
        # the per-expert on-disk gate is rows :inter of the fused value
        plain = lazyfp8.LazyFP8View(d)
        assert torch.equal(plain.get_tensor("model.layers.0.mlp.experts.0.up_proj.weight"), sd["layers.0.mlp.experts.gate_up_proj"][0, inter:])


def test_fused_experts_quantized_per_expert_from_a_model(tmp_path):
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(3, 8, 16))
            self.down_proj = torch.nn.Parameter(torch.randn(3, 16, 4))

    model = torch.nn.Module()
    model.mlp = torch.nn.Module()
    model.mlp.experts = Experts()
    model.mlp.proj = torch.nn.Linear(16, 16, bias=False)
    mapping = EXPERTS[1:]
    lazyfp8.save(model, tmp_path, key_mapping=mapping)  # per-tensor FP8, each expert its own scale
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_slice("mlp.experts.2.up_proj.weight").get_dtype() == "F8_E4M3"
        assert "mlp.experts.2.up_proj.weight_scale_inv" in f.keys() and "mlp.proj.weight_scale_inv" in f.keys()
    view = lazyfp8.LazyFP8View(tmp_path, key_mapping=mapping, dtype=torch.float32)
    plain = lazyfp8.LazyFP8View(tmp_path, dtype=torch.float32)
    fused = view.get_tensor("mlp.experts.gate_up_proj")
    want = torch.stack([torch.cat([plain.get_tensor(f"mlp.experts.{e}.{p}_proj.weight") for p in ("gate", "up")]) for e in range(3)])
    assert torch.equal(fused, want)
    assert (fused - model.mlp.experts.gate_up_proj.detach()).abs().max() < 0.1 * model.mlp.experts.gate_up_proj.abs().max()


def test_fused_qkv_of_unequal_parts_and_its_split_inverse(tmp_path):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 6, generator=g).to(torch.bfloat16) for n in (8, 4, 4))
    fuse = [Fuse(["q_proj.weight", "k_proj.weight", "v_proj.weight"], "qkv_proj.weight", cat_dim=0, sizes=(8, 4, 4))]
    lazyfp8.save({"attn.qkv_proj.weight": torch.cat([q, k, v])}, tmp_path / "a", key_mapping=fuse, scheme=None)
    assert stored_keys(tmp_path / "a") == {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"}
    view = lazyfp8.LazyFP8View(tmp_path / "a", key_mapping=fuse)
    assert torch.equal(view.get_tensor("attn.qkv_proj.weight"), torch.cat([q, k, v]))
    assert view.info("attn.qkv_proj.weight").parts[1] == "attn.k_proj.weight -> [8:12, 0:6]"
    # the other way: stored fused (NeMo/Megatron style), read as three
    split = [Split("qkv_proj.weight", ("q_proj.weight", "k_proj.weight", "v_proj.weight"), dim=0, sizes=(8, 4, 4))]
    lazyfp8.save({"attn.q_proj.weight": q, "attn.k_proj.weight": k, "attn.v_proj.weight": v}, tmp_path / "b", key_mapping=split, scheme=None)
    assert stored_keys(tmp_path / "b") == {"attn.qkv_proj.weight"}
    view = lazyfp8.LazyFP8View(tmp_path / "b", key_mapping=split)
    assert set(view) == {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"}
    assert torch.equal(view.get_tensor("attn.k_proj.weight"), k)
    assert view.bytes_read == k.numel() * 2  # only k's rows


def test_composite_rule_errors_name_the_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"mlp.experts.{e}.gate_proj.weight": torch.randn(2, 3, generator=g) for e in (0, 1, 3)}
    lazyfp8.save(tensors, tmp_path, scheme=None)
    gate = [Fuse(["mlp.experts.*.gate_proj.weight"], "mlp.experts.gate", stack_dim=0)]
    with pytest.raises(KeyMappingError, match=r"'mlp\.experts\.gate' is missing part\(s\) \[2\]"):
        lazyfp8.LazyFP8View(tmp_path, key_mapping=gate)
    with pytest.raises(KeyMappingError, match="equal parts; give Fuse"):
        lazyfp8.save({"qkv_proj.weight": torch.zeros(7, 2)}, tmp_path / "x", scheme=None,
                     key_mapping=[Fuse(["q_proj.weight", "k_proj.weight"], "qkv_proj.weight")])  # fmt: skip
    assert not (tmp_path / "x").exists()
    with pytest.raises(KeyMappingError, match="at most one"):
        Fuse(["a.*.b.*"], "c")
