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
