import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazyfp8 import PRESETS, KeyMapping, KeyMappingError, Rule, prefix_rule
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
