"""Attacks on composite keys: whatever names and shapes a checkpoint's headers hold, building a
view with fused values ends quickly with the right layout or a KeyMappingError naming the keys,
before any data is read; never a hang, a huge allocation, or wrong bits."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lazyfp8
from lazyfp8 import Fuse, KeyMappingError, LazyFP8View
from tests.helpers import deadline

GATE = [Fuse(["mlp.experts.*.gate_proj.weight"], "mlp.experts.gate", stack_dim=0)]


@pytest.fixture(autouse=True)
def _deadline():
    with deadline(120, "building a composite hung"):
        yield


def write(path, tensors, config=None):
    lazyfp8.save(tensors, path, scheme=None, config=config)
    return path


def test_an_expert_index_of_a_trillion_is_named_not_enumerated(tmp_path):
    # A range up to the largest index would take terabytes: the gap is found from the keys.
    tensors = {f"mlp.experts.{e}.gate_proj.weight": torch.zeros(2, 2) for e in (0, 10**12)}
    write(tmp_path, tensors)
    with pytest.raises(KeyMappingError, match=r"missing part\(s\) \[1, 2, 3, 4, 5, 6, 7, 8\]"):
        LazyFP8View(tmp_path, key_mapping=GATE)


def test_the_same_for_transformers_mapping(tmp_path):
    pytest.importorskip("transformers")
    tensors = {
        f"model.layers.0.mlp.experts.{e}.{p}_proj.weight": torch.zeros(2, 2) for e in (0, 10**15) for p in ("gate", "up", "down")
    }
    write(tmp_path, tensors, {"model_type": "qwen3_moe"})
    view = LazyFP8View(tmp_path)  # one to one: fine
    with pytest.raises(KeyMappingError, match=r"missing expert\(s\) \[1, 2, 3"):
        LazyFP8View(tmp_path, key_mapping="transformers")
    assert view.bytes_read == 0


def test_leading_zeros_do_not_make_two_experts_one(tmp_path):
    tensors = {"mlp.experts.1.gate_proj.weight": torch.zeros(2, 2), "mlp.experts.01.gate_proj.weight": torch.ones(2, 2),
               "mlp.experts.0.gate_proj.weight": torch.ones(2, 2)}  # fmt: skip
    write(tmp_path, tensors)
    with pytest.raises(KeyMappingError, match=r"'mlp\.experts\.(0?1)\.gate_proj\.weight' and 'mlp\.experts\.(0?1)\.gate_proj\.weight' are both part 1"):
        LazyFP8View(tmp_path, key_mapping=GATE)


def test_a_huge_interleave_is_materialized_not_cut_into_billions_of_pieces(tmp_path):
    pytest.importorskip("transformers")
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import Interleave, WeightConverter

    from lazyfp8.composite import MAX_SLABS

    register_checkpoint_conversion_mapping(
        "lazyfp8_redteam_interleave",
        [WeightConverter("w13.weight", "gate_up.weight", operations=[Interleave(dim=0)])],
        overwrite=True,
    )
    rows = 2 * MAX_SLABS + 2
    write(tmp_path, {"w13.weight": torch.arange(rows, dtype=torch.float32).reshape(rows, 1)}, {"model_type": "lazyfp8_redteam_interleave"})
    view = LazyFP8View(tmp_path, key_mapping="transformers")
    assert view.materialized == ["gate_up.weight"]
    got = view.get_tensor("gate_up.weight").flatten()
    assert torch.equal(got, torch.cat([torch.arange(0, rows, 2), torch.arange(1, rows, 2)]).float())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 3), st.integers(1, 3)), min_size=1, max_size=6, unique_by=lambda t: t[0]))
def test_random_expert_sets_and_shapes_load_or_are_refused_by_name(tmp_path_factory, experts):
    """Any set of expert numbers and shapes: either all experts 0..n-1 of one shape (loads, right
    bits) or a KeyMappingError that names the fused key, before any read."""
    path = tmp_path_factory.mktemp("c")
    tensors = {f"mlp.experts.{e}.gate_proj.weight": torch.full((r, c), float(e)) for e, r, c in experts}
    write(path, tensors)
    numbers = sorted(e for e, _, _ in experts)
    shapes = {(r, c) for _, r, c in experts}
    if numbers == list(range(len(numbers))) and len(shapes) == 1:
        view = LazyFP8View(path, key_mapping=GATE)
        assert torch.equal(view.get_tensor("mlp.experts.gate"), torch.stack([tensors[f"mlp.experts.{e}.gate_proj.weight"] for e in numbers]))
    else:
        with pytest.raises(KeyMappingError, match=r"mlp\.experts\.(gate|[0-9]+\.gate_proj\.weight)"):
            LazyFP8View(path, key_mapping=GATE)
