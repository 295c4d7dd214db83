"""Composite layouts: reading any box of a stacked/concatenated/sliced/transposed value gives what
torch's own ops on the whole tensors give, reading from each stored tensor only its part."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfp8 import KeyMappingError
from lazyfp8.composite import (
    CompositeSource,
    cat,
    check_tiling,
    chunk,
    interleave,
    leaf,
    narrow,
    stack,
    transpose,
)


class Stored:
    """An in-memory stored tensor that counts the elements it is asked for."""

    def __init__(self, key, value):
        self.key, self.value = key, value
        self.dtype, self.device = value.dtype, value.device
        self.read = 0

    @property
    def shape(self):
        return self.value.shape

    def read_box_into(self, dst, offsets, lengths):
        assert tuple(dst.shape) == tuple(lengths)
        box = self.value[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
        self.read += box.numel()
        dst.copy_(box)


def stored(key, *shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Stored(key, torch.randn(*shape, generator=g).to(torch.bfloat16))


def read_box(source, offsets, lengths):
    out = torch.full(lengths, float("nan"), dtype=source.dtype)
    source.read_box_into(out, offsets, lengths)
    return out


def test_fused_experts_layout_matches_stack_of_cat():
    experts, inter, hidden = 3, 4, 5
    gates = [stored(f"e{e}.gate", inter, hidden, seed=e) for e in range(experts)]
    ups = [stored(f"e{e}.up", inter, hidden, seed=10 + e) for e in range(experts)]
    layout = stack([cat([leaf(g), leaf(u)], 0) for g, u in zip(gates, ups)], 0)
    fused = CompositeSource("experts.gate_up_proj", layout)
    want = torch.stack([torch.cat([g.value, u.value]) for g, u in zip(gates, ups)])
    assert fused.shape == want.shape == (3, 8, 5)
    assert torch.equal(fused.to_tensor(), want)
    # one expert's box (expert parallel) reads only that expert's two tensors
    for s in gates + ups:
        s.read = 0
    assert torch.equal(read_box(fused, (1, 0, 0), (1, 8, 5)), want[1:2])
    assert [s.read for s in gates] == [0, 20, 0] and [s.read for s in ups] == [0, 20, 0]
    # the up half only (a shard of the concatenated dimension) never touches a gate
    for s in gates + ups:
        s.read = 0
    assert torch.equal(read_box(fused, (0, 4, 0), (3, 4, 5)), want[:, 4:])
    assert sum(s.read for s in gates) == 0 and sum(s.read for s in ups) == 60


def transformers_interleave(t, dim, inverse):
    """transformers' Interleave, written out: split ``dim`` in two and transpose."""
    shape = list(t.shape)
    shape[dim : dim + 1] = [2, shape[dim] // 2] if inverse else [shape[dim] // 2, 2]
    return t.reshape(shape).transpose(dim, dim + 1).reshape(t.shape)


@st.composite
def layouts(draw):
    """A random tree of stack/cat/narrow/transpose over small stored tensors, with the tensor
    torch's ops make of the same values."""
    counter = iter(range(10_000))
    dims = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 4)) for _ in range(dims)]

    def node(depth, shape):
        kind = draw(st.sampled_from(["leaf"] if depth == 0 else ["leaf", "cat", "stack", "narrow", "transpose", "interleave"]))
        if kind == "cat" and shape:
            d = draw(st.integers(0, len(shape) - 1))
            cuts = sorted(draw(st.sets(st.integers(1, shape[d] - 1), max_size=2))) if shape[d] > 1 else []
            sizes = [b - a for a, b in zip([0, *cuts], [*cuts, shape[d]])]
            parts = [node(depth - 1, shape[:d] + [n] + shape[d + 1 :]) for n in sizes]
            return cat([p[0] for p in parts], d), torch.cat([p[1] for p in parts], d)
        if kind == "stack" and len(shape) >= 2:
            d = draw(st.integers(0, len(shape) - 1))
            inner = shape[:d] + shape[d + 1 :]
            parts = [node(depth - 1, inner) for _ in range(shape[d])]
            return stack([p[0] for p in parts], d), torch.stack([p[1] for p in parts], d)
        if kind == "narrow" and shape:
            d = draw(st.integers(0, len(shape) - 1))
            extra = draw(st.integers(0, 3))
            start = draw(st.integers(0, extra))
            lay, t = node(depth - 1, shape[:d] + [shape[d] + extra] + shape[d + 1 :])
            return narrow(lay, d, start, shape[d]), t.narrow(d, start, shape[d])
        if kind == "transpose" and len(shape) >= 2:
            a, b = draw(st.permutations(range(len(shape))))[:2]
            swapped = list(shape)
            swapped[a], swapped[b] = swapped[b], swapped[a]
            lay, t = node(depth - 1, swapped)
            return transpose(lay, a, b), t.transpose(a, b)
        if kind == "interleave" and shape and shape[0] % 2 == 0:
            inverse = draw(st.booleans())
            lay, t = node(depth - 1, shape)
            return interleave(lay, 0, inverse), transformers_interleave(t, 0, inverse)
        s = stored(f"t{next(counter)}", *shape, seed=next(counter))
        return leaf(s), s.value

    layout, want = node(3, shape)
    return layout, want


@settings(max_examples=150, deadline=None)
@given(layouts(), st.data())
def test_any_box_of_any_layout_reads_what_torch_ops_give(case, data):
    layout, want = case
    assert tuple(layout.shape) == tuple(want.shape)
    source = CompositeSource("k", layout)
    offsets, lengths = [], []
    for size in want.shape:
        o = data.draw(st.integers(0, size))
        offsets.append(o)
        lengths.append(data.draw(st.integers(0, size - o)))
    got = read_box(source, offsets, lengths)
    assert torch.equal(got, want[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))])
    # and read into a non-contiguous destination (a DTensor's local shard may be one)
    wide = torch.full([n * 2 for n in lengths] or [], float("nan"), dtype=want.dtype)
    dst = wide[tuple(slice(None, None, 2) for _ in lengths)] if lengths else wide
    source.read_box_into(dst, offsets, lengths)
    assert torch.equal(dst, want[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))])


def test_chunk_splits_like_torch_chunk():
    s = stored("fused", 7, 3)
    parts = chunk(leaf(s), 3, 0)
    for lay, want in zip(parts, torch.chunk(s.value, 3, 0)):
        assert torch.equal(CompositeSource("k", lay).to_tensor(), want)


def test_shapes_that_do_not_fit_are_refused_naming_the_tensors():
    a, b = stored("experts.0.gate", 4, 5), stored("experts.1.gate", 4, 6)
    with pytest.raises(KeyMappingError, match=r"experts\.1\.gate.*\[4, 6\].*experts\.0\.gate.*\[4, 5\]"):
        stack([leaf(a), leaf(b)])
    with pytest.raises(KeyMappingError, match="concatenate"):
        cat([leaf(stored("x", 2, 3)), leaf(stored("y", 2, 4))], 0)


def test_overlaps_and_gaps_are_refused_before_reading():
    import dataclasses

    from lazyfp8.composite import Layout

    a, b = stored("a", 2, 3), stored("b", 2, 3)
    la, lb = leaf(a), leaf(b)
    two_sources = Layout((2, 3), la.pieces + lb.pieces)
    with pytest.raises(KeyMappingError, match=r"two sources for one slice: a -> \[0:2, 0:3\] and b"):
        check_tiling("fused", two_sources)
    gap = Layout((4, 3), la.pieces)
    with pytest.raises(KeyMappingError, match="'fused'.*cover 6 of its 12 elements.*missing"):
        check_tiling("fused", gap)
    outside = Layout((2, 3), (dataclasses.replace(la.pieces[0], at=(1, 0)),))
    with pytest.raises(KeyMappingError, match="outside"):
        check_tiling("fused", outside)
    assert a.read == b.read == 0


def test_sources_of_different_dtypes_are_refused():
    x = Stored("x", torch.zeros(2, 2, dtype=torch.bfloat16))
    y = Stored("y", torch.zeros(2, 2, dtype=torch.float32))
    with pytest.raises(KeyMappingError, match="different dtypes"):
        CompositeSource("k", cat([leaf(x), leaf(y)]))
