"""Bit-exact parity with torch's distributed-checkpoint reader for quantized HF checkpoints.

``torch.distributed.checkpoint.quantized_hf_storage.QuantizedHuggingFaceStorageReader(path,
target_dtype=..., block_size=128)`` reads a directory of ``*.safetensors`` files plus
``model.safetensors.index.json`` (it pairs ``X.weight`` with ``X.weight_scale_inv`` through the
index's ``weight_map`` and opens the scale's own file when it lives elsewhere). For each block it
computes ``(w.to(float32) * s[bi, bj]).to(target_dtype)`` with square ``block_size`` blocks,
clipped at ragged edges: the reference formula. ``dcp.load(sd, storage_reader=..., no_dist=True)``
fills ``sd``'s tensors in one process.

It indexes the scale as a 2-D grid, so it cannot read a 0-d per-tensor scale (it raises) and
misreads an ``[N, 1]`` per-channel scale as a block grid (wrong values, or an IndexError when the
weight is wider than one block); lazyfp8 reads both.
"""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader

from lazyfp8 import LazyFP8View, PerBlock, PerChannel, PerTensor
from tests.builders import expected, fp8_block_config, quantize_state_dict
from tests.helpers import bits, reference, write_layout
from tests.strategies import fp8_codes

# dcp.load(no_dist=True) warns that torch.distributed is not initialized: that is the point.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

# Block-scaled weights: ragged both ways, ragged one way, narrower than a block, one row, even.
SHAPES = {
    "a.weight": (300, 200),
    "b.weight": (130, 129),
    "c.weight": (256, 384),
    "d.weight": (200, 64),
    "e.weight": (1, 1000),
    "f.weight": (128, 128),
}


def dcp_read(path, shapes, dtype, block, plain=()):
    """``dcp.load`` into fresh tensors; FP8 weights in ``dtype``, ``plain`` keys in BF16."""
    sd = {k: torch.empty(s, dtype=torch.bfloat16 if k in plain else dtype) for k, s in shapes.items()}
    reader = QuantizedHuggingFaceStorageReader(path, target_dtype=dtype, block_size=block)
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


@pytest.fixture(scope="module", params=[128, 64], ids=["block128", "block64"])
def block_checkpoint(request, tmp_path_factory):
    """A checkpoint in the DeepSeek layout: realistic weights quantized in ``b x b`` blocks, one
    e5m2 weight, one weight of raw random bytes (every code, NaN included) with random scales, a
    BF16 norm; scales in their own shard so each is read from another file than its weight."""
    b = request.param
    g = torch.Generator().manual_seed(b)
    weights = {k: torch.randn(s, generator=g) * 0.05 for k, s in SHAPES.items()}
    disk, q = quantize_state_dict(weights, lambda k: k != "b.weight", PerBlock((b, b)))
    e5, q5 = quantize_state_dict(
        {"b.weight": weights["b.weight"]}, lambda k: True, PerBlock((b, b)), fp8_dtype=torch.float8_e5m2
    )
    disk.update(e5)
    q.update(q5)
    codes = fp8_codes((260, 140), torch.float8_e4m3fn, 1)
    scale = torch.exp2(torch.rand(-(-260 // b), -(-140 // b), generator=g) * 40 - 30)
    disk["raw.weight"], disk["raw.weight_scale_inv"] = codes, scale
    q["raw.weight"] = (codes, scale)
    disk["norm.weight"] = torch.randn(64, generator=g).to(torch.bfloat16)
    path = str(tmp_path_factory.mktemp(f"dcp{b}"))
    write_layout(path, disk, fp8_block_config({}, (b, b)), shards=2, scales_apart=True)
    return path, b, q, disk


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_block_scaled_with_ragged_edges_bit_exact(block_checkpoint, dtype):
    path, b, quantized, disk = block_checkpoint
    shapes = {k: tuple(disk[k].shape) for k in [*quantized, "norm.weight"]}
    theirs = dcp_read(path, shapes, dtype, b, plain=("norm.weight",))
    with LazyFP8View(path, dtype=dtype) as view:
        assert set(view) == set(shapes)  # the scales are not keys
        for key in shapes:
            ours = view.get_tensor(key)
            assert ours.dtype == theirs[key].dtype, key
            assert torch.equal(bits(ours), bits(theirs[key])), key
    for key, (codes, scale) in quantized.items():
        assert torch.equal(bits(theirs[key]), bits(expected(codes, scale, dtype, (b, b)))), key
    assert torch.equal(bits(theirs["norm.weight"]), bits(disk["norm.weight"]))


def test_scale_in_the_same_file_as_its_weight(tmp_path):
    # The other branch of the reader: scale read through the weight's own file handle.
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(4))
    disk, q = quantize_state_dict({"w.weight": w}, lambda k: True, PerBlock((128, 128)))
    write_layout(str(tmp_path), disk, fp8_block_config({}))  # one file and an index, as DCP needs
    theirs = dcp_read(str(tmp_path), {"w.weight": (300, 200)}, torch.bfloat16, 128)
    ours = LazyFP8View(str(tmp_path)).get_tensor("w.weight")
    assert torch.equal(bits(ours), bits(theirs["w.weight"]))
    assert torch.equal(bits(ours), bits(expected(*q["w.weight"], torch.bfloat16, (128, 128))))


def test_dcp_fails_on_a_0d_per_tensor_scale_lazyfp8_reads_it(tmp_path):
    # Mistral-3 style: one 0-d F32 weight_scale_inv. The reader indexes scale_inv[bi, bj] and a
    # 0-d tensor has no dimensions: IndexError, wrapped by dcp in a CheckpointException (a
    # BaseException, not an Exception).
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(6))
    disk, q = quantize_state_dict({"w.weight": w}, lambda k: True, PerTensor())
    assert disk["w.weight_scale_inv"].shape == ()
    write_layout(str(tmp_path), disk, {"quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(CheckpointException, match="too many indices for tensor of dimension 0") as err:
        dcp_read(str(tmp_path), {"w.weight": (64, 48)}, torch.bfloat16, 128)
    ((failure, _trace),) = err.value.failures.values()
    assert isinstance(failure, IndexError)
    ours = LazyFP8View(str(tmp_path)).get_tensor("w.weight")
    assert torch.equal(bits(ours), bits(reference(*q["w.weight"], torch.bfloat16)))


def test_dcp_misreads_a_per_channel_scale(tmp_path):
    # An [N, 1] per-channel scale named weight_scale_inv (fbgemm-like values under the HF name).
    # DCP takes it for a block grid: row i gets scale[i // 128], so for a weight at most one block
    # wide every row of the first 128 uses row 0's scale, silently; wider, it indexes column 1 of a
    # 1-column scale and raises.
    g = torch.Generator().manual_seed(8)
    narrow = torch.randn(64, 96, generator=g) * torch.linspace(0.1, 4, 64)[:, None]
    disk, q = quantize_state_dict({"w.weight": narrow}, lambda k: True, PerChannel())
    wide, _ = quantize_state_dict(
        {"x.weight": torch.randn(64, 200, generator=g)}, lambda k: True, PerChannel()
    )
    write_layout(str(tmp_path / "narrow"), disk)
    write_layout(str(tmp_path / "wide"), wide)
    codes, scale = q["w.weight"]

    theirs = dcp_read(str(tmp_path / "narrow"), {"w.weight": (64, 96)}, torch.float32, 128)["w.weight"]
    right = expected(codes, scale, torch.float32, None)
    assert not torch.equal(theirs, right)
    assert torch.equal(bits(theirs), bits(reference(codes, scale[0, 0], torch.float32)))
    ours = LazyFP8View(str(tmp_path / "narrow"), dtype=torch.float32).get_tensor("w.weight")
    assert torch.equal(bits(ours), bits(right))

    with pytest.raises(CheckpointException, match="index 1 is out of bounds for dimension 1 with size 1"):
        dcp_read(str(tmp_path / "wide"), {"x.weight": (64, 200)}, torch.float32, 128)
    assert LazyFP8View(str(tmp_path / "wide")).info("x.weight").granularity == PerChannel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lazyfp8_reader_is_a_drop_in_for_torchs(block_checkpoint, dtype):
    """The same call with the class swapped: torch's arguments (thread_count, target_dtype, an int
    block_size) mean the same to LazyFP8StorageReader, and the state dicts come out equal."""
    import lazyfp8

    path, b, quantized, disk = block_checkpoint
    shapes = {k: tuple(disk[k].shape) for k in [*quantized, "norm.weight"]}
    results = []
    for cls in (QuantizedHuggingFaceStorageReader, lazyfp8.LazyFP8StorageReader):
        sd = {k: torch.empty(s, dtype=torch.bfloat16 if k == "norm.weight" else dtype) for k, s in shapes.items()}
        dcp.load(sd, storage_reader=cls(path, thread_count=2, target_dtype=dtype, block_size=b), no_dist=True)
        results.append(sd)
    for key in shapes:
        assert torch.equal(bits(results[0][key]), bits(results[1][key])), key
    reader = lazyfp8.LazyFP8StorageReader(path, thread_count=2, target_dtype=dtype, block_size=b)
    assert reader.view.dtype == dtype and reader.view._threads == 2


def test_target_dtype_and_dtype_must_agree(tmp_path):
    import lazyfp8

    with pytest.raises(ValueError, match="disagree"):
        lazyfp8.LazyFP8StorageReader(str(tmp_path), target_dtype=torch.float32, dtype=torch.bfloat16)
