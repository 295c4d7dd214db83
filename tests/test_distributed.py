"""Sharded loads on torch.distributed: every rank holds exactly its slice of the single-process
view, bit for bit, and reads exactly the bytes of its slice.

Real processes on CPU with the gloo backend. Each world size (2 and 4 ranks) is one launch of
spawned processes that runs every scenario below in turn and records, per rank and scenario, the
local tensors, the placement and mesh coordinate of each, and ``bytes_read``; the tests then check
the records in this (parent) process against the single-process ``LazyFP8View.get_tensor``:

- FSDP2 ``fully_shard`` over a meta model + ``to_empty`` (and over a real CPU model), loaded with
  ``model.load_state_dict(view, strict=True)`` and with ``lazyfp8.load_into(model, view)``, then a
  forward pass (the all-gathered weights) against the single-process model's;
- tensor parallel: ``parallelize_module`` (Colwise/Rowwise: ``Shard(0)``, ``Shard(1)``,
  ``Replicate()``) and dicts of ``distribute_tensor`` DTensors filled with ``dst.copy_(view[k])``,
  on a 1-D mesh and (4 ranks) a 2-D mesh, for every scale format;
- ``dcp.load`` with :class:`lazyfp8.LazyFP8StorageReader` (with a key mapping) into DTensor state
  dicts and into an FSDP2 model's state dict, for every scale format;
- FSDP2 over TP (``_StridedShard``): refused loudly, nothing wrong is loaded.

Every scale format includes the packed ones (NVFP4, MXFP4, int4 groups: codes two a byte). The
shapes put shard boundaries inside 128x128 blocks (300 rows / 4 ranks = 75; 224 columns / 4 = 56;
130 rows / 2 ranks ...) and inside 16- and 32-element groups, give uneven last shards (301 rows over 4:
76, 76, 76, 73) and empty shards (3 rows over 4 ranks). The expected box of every rank is computed
here from torch's chunking rule (``ceil(n / ranks)`` per rank), not taken from torch or lazyfp8.
"""

from __future__ import annotations

import datetime
import math
import multiprocessing
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import lazyfp8
from lazyfp8 import LazyFP8View, PerBlock, PerChannel, PerTensor
from lazyfp8.formats.codecs import E2M1, INT4
from lazyfp8.storage.checkpoint import open_checkpoint
from tests.builders import expected as reference_dequant
from tests.helpers import bits

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed"),
    pytest.mark.skipif(
        torch.distributed.is_available() and not torch.distributed.is_gloo_available(), reason="needs gloo"
    ),
]

WORLDS = (2, 4)
LAUNCH_TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------------
# The model (FSDP2 and TP scenarios) and its checkpoint
# ------------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """Embedding, two Linears (an MLP), a norm and a head: 128x128 block-scaled FP8 Linears
    whose shard boundaries fall inside blocks, an uneven vocabulary, a head with fewer rows
    (3) than ranks (4)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(301, 200)  # bf16; rows 76/76/76/73 over 4 ranks
        self.up = nn.Linear(200, 300, bias=False)  # FP8 [300, 200]; rows 75 per rank over 4
        self.down = nn.Linear(300, 260)  # FP8 [260, 300]; TP Shard(1): 75 columns per rank
        self.norm = nn.LayerNorm(260)  # bf16 weight and bias
        self.head = nn.Linear(260, 3, bias=False)  # FP8 [3, 260]: an empty shard on 4 ranks

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.down(F.gelu(self.up(self.embed(ids))))
        return self.head(self.norm(h))


#: Token ids touching every rank's slice of the vocabulary.
IDS = torch.tensor([[0, 5, 75, 76, 151, 152, 227, 228, 299, 300]])

# ------------------------------------------------------------------------------------------------
# The scheme checkpoints (TP dicts and DCP): every scale format, ragged shapes, a 3-D weight
# ------------------------------------------------------------------------------------------------
#: Stored names are ``model.*``; runtime names drop the prefix.
KEY_MAPPING = {r"^model\.": ""}

#: Quantized columns are whole 32-element groups (what FP4 and int4 producers require); their
#: shards still split 128-column blocks and 16- and 32-element groups.
SHAPES = {
    "model.embed.weight": (301, 200),  # bf16
    "model.layers.0.up.weight": (300, 224),  # quantized
    "model.layers.0.down.weight": (260, 320),  # quantized
    "model.layers.0.down.bias": (260,),  # bf16
    "model.layers.0.experts.weight": (3, 200, 160),  # quantized, fused experts [E, R, C]
    "model.layers.0.tiny.weight": (3, 64),  # quantized, fewer rows than ranks
    "model.norm.weight": (260,),  # bf16
}
FP8_KEYS = ("up.weight", "down.weight", "experts.weight", "tiny.weight")

#: name -> ``lazyfp8.save`` arguments.
SCHEMES = {
    "per_tensor": {"scheme": PerTensor(), "format": "fp8", "config": {}},  # 0-d float32 scales
    "per_channel": {"scheme": PerChannel(), "format": "compressed-tensors", "config": {}},  # [rows, 1]
    "block128": {"scheme": PerBlock((128, 128)), "format": "fp8", "config": {}},  # ragged grids
    "mx_ue8m0": {"scheme": "mx", "ue8m0": True, "config": None},  # uint8 exponents over 1x32 blocks
    # packed codes: two a byte, e4m3 scales per 16 and a global scale; ue8m0 per 32; int4 in int32 words
    "nvfp4": {"scheme": "nvfp4", "format": "compressed-tensors", "config": {}},
    "mxfp4": {"scheme": "mxfp4", "format": "compressed-tensors", "config": {}},
    # compressed-tensors packs 2-D weights only: the 3-D experts stay unquantized here
    "int4": {"scheme": "int4", "group_size": 32, "config": {}, "keys": tuple(k for k in FP8_KEYS if k != "experts.weight")},
}
#: The schemes whose codes are packed: their bytes are counted per row's code span.
PACKED = ("nvfp4", "mxfp4", "int4")

# Placements per runtime key: "S<d>" is Shard(d), "R" Replicate(); None: a plain tensor, which every
# rank reads whole. One entry per mesh dimension.
LAYOUTS_1D = {
    # dicts of DTensors
    "a": {
        "embed.weight": ("S1",),  # columns: one read per row
        "layers.0.up.weight": ("S1",),  # 224 cols / 4 = 56: inside 128-col blocks, 16- and 32-groups
        "layers.0.down.weight": ("S0",),
        "layers.0.down.bias": ("R",),
        "layers.0.experts.weight": ("S2",),  # 160 / 4 = 40: crosses the 128 boundary on rank 3
        "layers.0.tiny.weight": ("S0",),  # 3 rows: rank 3 of 4 is empty
        "norm.weight": ("S0",),
    },
    # dcp.load
    "b": {
        "embed.weight": ("S0",),  # 301 rows: uneven last shard
        "layers.0.up.weight": ("S0",),  # 300 / 4 = 75, 300 / 2 = 150: inside 128-row blocks
        "layers.0.down.weight": ("S1",),  # 320 / 4 = 80 columns
        "layers.0.down.bias": None,
        "layers.0.experts.weight": ("S1",),  # rows of each expert: 200 / 4 = 50
        "layers.0.tiny.weight": ("S1",),
        "norm.weight": ("R",),
    },
}
LAYOUTS_2D = {  # a (2, 2) mesh, 4 ranks
    "a": {
        "embed.weight": ("S0", "S1"),
        "layers.0.up.weight": ("S1", "S0"),
        "layers.0.down.weight": ("S0", "S0"),  # dim 0 split twice: 65 rows per rank
        "layers.0.down.bias": ("R", "S0"),
        "layers.0.experts.weight": ("S0", "S2"),  # 3 experts over 2: 2 and 1
        "layers.0.tiny.weight": ("S1", "R"),
        "norm.weight": ("R", "R"),
    },
    "b": {
        "embed.weight": ("R", "S1"),
        "layers.0.up.weight": ("S0", "S1"),
        "layers.0.down.weight": ("S1", "S1"),  # dim 1 split twice: 80 columns per rank
        "layers.0.down.bias": ("S0", "R"),
        "layers.0.experts.weight": ("S1", "S0"),
        "layers.0.tiny.weight": ("S0", "S0"),  # 3 rows over 4: 1, 1, 1, 0
        "norm.weight": None,
    },
}


# ------------------------------------------------------------------------------------------------
# Worker side: one process per rank
# ------------------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self, rank: int, world: int, ckpts: dict[str, str], device: str):
        from torch.distributed.device_mesh import init_device_mesh

        self.rank, self.world, self.ckpts, self.device = rank, world, ckpts, device
        # Every mesh is built here, by every rank in the same order: new_group is a collective.
        # On CUDA every rank uses the one GPU (cuda:0 = rank % device_count on a 1-GPU machine).
        self.mesh = init_device_mesh(device, (world,))
        self.mesh2 = init_device_mesh(device, (2, world // 2), mesh_dim_names=("dp", "tp")) if world == 4 else None


def _placements(spec: tuple[str, ...]):
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if p == "R" else Shard(int(p[1:])) for p in spec]


def _encode(placements) -> tuple[str, ...]:
    """``S<d>`` Shard(d), ``SS<d>`` _StridedShard(d) (FSDP2 over TP), ``R`` Replicate()."""
    from torch.distributed.tensor import Replicate, Shard

    out = []
    for p in placements:
        if type(p) is Shard:
            out.append(f"S{p.dim}")
        elif type(p) is Replicate:
            out.append("R")
        elif type(p).__name__ == "_StridedShard":
            out.append(f"SS{p.dim}")
        else:
            out.append(repr(p))
    return tuple(out)


def _record(named, bytes_read: int) -> dict:
    """Local tensors with their placement, mesh coordinate and lazyfp8's box, and bytes read."""
    from torch.distributed.tensor import DTensor

    from lazyfp8.distributed import local_box

    out = {}
    for key, t in named:
        if isinstance(t, DTensor):
            out[key] = {
                "local": t.to_local().detach().cpu().clone(),
                "device": t.to_local().device.type,
                "shape": tuple(t.shape),
                "placements": _encode(t.placements),
                "mesh_shape": tuple(t.device_mesh.shape),
                "coord": tuple(t.device_mesh.get_coordinate()),
                "box": local_box(t),
            }
        else:
            out[key] = {"local": t.detach().cpu().clone(), "device": t.device.type, "shape": tuple(t.shape), "placements": None}
    return {"tensors": out, "bytes_read": bytes_read}


def _meta_tiny() -> Tiny:
    with torch.device("meta"):
        return Tiny().to(torch.bfloat16)


def _shard_columns(param: nn.Parameter):
    from torch.distributed.tensor import Shard

    return Shard(1) if param.dim() == 2 else None  # None: FSDP2's default, Shard(0)


def _fsdp(model: nn.Module, mesh, placement_fn=None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in (model.up, model.down):
        fully_shard(block, mesh=mesh, shard_placement_fn=placement_fn)
    return fully_shard(model, mesh=mesh, shard_placement_fn=placement_fn)


def _scenario_fsdp(ctx: _Ctx, how: str, build: str, columns: bool = False) -> dict:
    placement_fn = _shard_columns if columns else None
    if build == "meta":  # the FSDP2 recipe: build on meta, shard, to_empty, load
        model = _fsdp(_meta_tiny(), ctx.mesh, placement_fn)
        model.to_empty(device="cpu")
    else:  # a real (randomly initialized) CPU model, sharded, then overwritten by the load
        torch.manual_seed(ctx.rank)
        model = _fsdp(Tiny().to(torch.bfloat16), ctx.mesh, placement_fn)
    view = LazyFP8View(ctx.ckpts["model"])
    if how == "load_state_dict":
        result = model.load_state_dict(view, strict=True)
    else:
        result = lazyfp8.load_into(model, view)
    rec = _record(model.named_parameters(), view.bytes_read)
    rec["incompatible"] = (list(result.missing_keys), list(result.unexpected_keys))
    with torch.no_grad():
        rec["output"] = model(IDS)
    return rec


def _scenario_fsdp_meta_refused(ctx: _Ctx) -> dict:
    model = _fsdp(_meta_tiny(), ctx.mesh)  # no to_empty
    view = LazyFP8View(ctx.ckpts["model"])
    try:
        lazyfp8.load_into(model, view)
    except RuntimeError as e:
        return {"raised": str(e), "bytes_read": view.bytes_read}
    return {"raised": None, "bytes_read": view.bytes_read}


def _scenario_tp_module(ctx: _Ctx) -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _meta_tiny()
    plan = {
        "embed": RowwiseParallel(input_layouts=Replicate()),  # vocab-parallel: Shard(0), 301 rows
        "up": ColwiseParallel(),  # Shard(0)
        "down": RowwiseParallel(),  # weight Shard(1), bias Replicate()
    }  # norm and head stay plain tensors: every rank reads them whole
    parallelize_module(model, ctx.mesh, plan)
    model.to_empty(device="cpu")
    view = LazyFP8View(ctx.ckpts["model"])
    model.load_state_dict(view, strict=True)
    rec = _record(model.named_parameters(), view.bytes_read)
    with torch.no_grad():
        rec["output"] = model(IDS)
    return rec


def _dtensor_dict(view: LazyFP8View, layout: dict, mesh, device: str = "cpu") -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import distribute_tensor

    sd = {}
    for key, spec in layout.items():
        empty = torch.empty(view[key].shape, dtype=view[key].dtype, device=device)
        # src_data_rank=None: no communication, each rank keeps its (uninitialized) chunk
        sd[key] = empty if spec is None else distribute_tensor(empty, mesh, _placements(spec), src_data_rank=None)
    return sd


def _scenario_tp_dict(ctx: _Ctx, scheme: str, layout: str, dims: int) -> dict:
    mesh, layouts = (ctx.mesh, LAYOUTS_1D) if dims == 1 else (ctx.mesh2, LAYOUTS_2D)
    view = LazyFP8View(ctx.ckpts[scheme], key_mapping=KEY_MAPPING)
    sd = _dtensor_dict(view, layouts[layout], mesh, ctx.device)
    for key, dst in sd.items():
        dst.copy_(view[key])  # a DTensor destination: this rank's box only
    return _record(sd.items(), view.bytes_read)


def _scenario_dcp(ctx: _Ctx, scheme: str, layout: str, dims: int) -> dict:
    import torch.distributed.checkpoint as dcp

    mesh, layouts = (ctx.mesh, LAYOUTS_1D) if dims == 1 else (ctx.mesh2, LAYOUTS_2D)
    sd = _dtensor_dict(LazyFP8View(ctx.ckpts[scheme], key_mapping=KEY_MAPPING), layouts[layout], mesh, ctx.device)
    # Small chunks: every box is read in many rectangles (row bands and row segments).
    reader = lazyfp8.LazyFP8StorageReader(ctx.ckpts[scheme], key_mapping=KEY_MAPPING, chunk_elements=3000)
    dcp.load(sd, storage_reader=reader)
    return _record(sd.items(), reader.view.bytes_read)


def _scenario_dcp_fsdp(ctx: _Ctx) -> dict:
    import torch.distributed.checkpoint as dcp

    model = _fsdp(_meta_tiny(), ctx.mesh)
    model.to_empty(device="cpu")
    reader = lazyfp8.LazyFP8StorageReader(ctx.ckpts["model"])
    dcp.load(model.state_dict(), storage_reader=reader)  # DTensors sharing the parameters' storage
    return _record(model.named_parameters(), reader.view.bytes_read)


def _scenario_fsdp_over_tp(ctx: _Ctx) -> dict:
    """The 2-D recipe (torchtitan's): TP inside a node, FSDP2 across; up.weight ends up as
    ``(_StridedShard(0), Shard(0))``: sharded by TP first, then FSDP2 splits the TP shard."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _meta_tiny()
    parallelize_module(model, ctx.mesh2["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    model = _fsdp(model, ctx.mesh2["dp"])
    model.to_empty(device="cpu")
    placements = {k: _encode(p.placements) for k, p in model.named_parameters()}
    view = LazyFP8View(ctx.ckpts["model"])
    try:
        model.load_state_dict(view, strict=True)
    except Exception as e:  # noqa: BLE001 - recorded and checked by the test
        # every rank fails on the same parameter, so no collective below is left unmatched
        return {"raised": f"{type(e).__name__}: {e}", "placements": placements, "bytes_read": view.bytes_read}
    rec = _record(model.named_parameters(), view.bytes_read)
    rec.update(raised=None, placements=placements)
    rec["full"] = {k: p.full_tensor().cpu() for k, p in model.named_parameters()}  # collectives
    return rec


SCENARIOS = {
    "fsdp_meta_load_state_dict": (_scenario_fsdp, {"how": "load_state_dict", "build": "meta"}),
    "fsdp_meta_load_into": (_scenario_fsdp, {"how": "load_into", "build": "meta"}),
    "fsdp_cpu_load_state_dict": (_scenario_fsdp, {"how": "load_state_dict", "build": "cpu"}),
    "fsdp_columns_load_state_dict": (_scenario_fsdp, {"how": "load_state_dict", "build": "meta", "columns": True}),
    "fsdp_meta_refused": (_scenario_fsdp_meta_refused, {}),
    "tp_module": (_scenario_tp_module, {}),
    "dcp_fsdp": (_scenario_dcp_fsdp, {}),
    **{f"tp_dict_1d_{s}": (_scenario_tp_dict, {"scheme": s, "layout": "a", "dims": 1}) for s in SCHEMES},
    **{f"dcp_1d_{s}": (_scenario_dcp, {"scheme": s, "layout": "b", "dims": 1}) for s in SCHEMES},
}
SCENARIOS_4 = {  # a 2-D mesh needs 4 ranks
    **{f"tp_dict_2d_{s}": (_scenario_tp_dict, {"scheme": s, "layout": "a", "dims": 2}) for s in SCHEMES},
    **{f"dcp_2d_{s}": (_scenario_dcp, {"scheme": s, "layout": "b", "dims": 2}) for s in SCHEMES},
    "fsdp_over_tp": (_scenario_fsdp_over_tp, {}),
}
#: On a CUDA mesh (where a GPU is present): every rank reads its boxes into CUDA shards, through
#: the pinned-buffer path.
SCENARIOS_CUDA = {
    **{f"cuda_tp_dict_1d_{s}": (_scenario_tp_dict, {"scheme": s, "layout": "a", "dims": 1}) for s in SCHEMES},
    **{f"cuda_dcp_1d_{s}": (_scenario_dcp, {"scheme": s, "layout": "b", "dims": 1}) for s in SCHEMES},
}
ALL_SCENARIOS = {**SCENARIOS, **SCENARIOS_4, **SCENARIOS_CUDA}


def _worker(rank: int, world: int, store: str, ckpts: dict[str, str], out_dir: str, device: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # 4 ranks on 2 cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    results: dict[str, dict] = {}
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        ctx = _Ctx(rank, world, ckpts, device)
        if device == "cuda":
            names = list(SCENARIOS_CUDA)
        else:
            names = list(SCENARIOS) + (list(SCENARIOS_4) if world == 4 else [])
        for name in names:
            fn, kwargs = ALL_SCENARIOS[name]
            t0 = time.perf_counter()
            try:
                results[name] = fn(ctx, **kwargs)
            except BaseException:  # noqa: BLE001 - reported per scenario, the others still run
                results[name] = {"error": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - t0
            torch.save(results, out)  # after each: a later hang keeps what was done
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(world: int, ckpts: dict[str, str], out_dir: Path, device: str = "cpu") -> list[dict]:
    """Run every scenario on ``world`` spawned ranks; return each rank's records."""
    ctx = multiprocessing.get_context("spawn")
    store = out_dir / "filestore"
    args = [(r, world, str(store), ckpts, str(out_dir), device) for r in range(world)]
    procs = [ctx.Process(target=_worker, args=a) for a in args]
    for p in procs:
        p.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    records = []
    for r in range(world):
        path = out_dir / f"rank{r}.pt"
        records.append(torch.load(path, weights_only=False) if path.exists() else {})
    if hung:
        done = {name for rec in records for name in rec}
        pytest.fail(f"ranks {hung} of {world} hung after {LAUNCH_TIMEOUT_S} s; scenarios finished: {sorted(done)}")
    bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
    assert not bad, f"ranks {bad} exited with {[procs[r].exitcode for r in bad]}"
    return records


# ------------------------------------------------------------------------------------------------
# Parent side: checkpoints, references, expected boxes and bytes
# ------------------------------------------------------------------------------------------------
class Checkpoint:
    """A checkpoint, its single-process tensors (the reference), and per key the stored bits per
    element and the bytes of what is read with each quantized tensor whole (its scale, and a
    packed weight's global scale, zero point, shape tensor; 0 for a tensor that is not
    quantized)."""

    def __init__(self, path: str, key_mapping=None):
        self.path = path
        view = LazyFP8View(path, key_mapping=key_mapping)
        stored = open_checkpoint(path).tensors
        self.full = {k: view.get_tensor(k) for k in view}
        self.bits, self.scale_bytes, self.raw = {}, {}, {}
        for k in view:
            info = view.info(k)
            self.bits[k] = 4 if info.codec in ("e2m1", "int4") else info.disk_dtype.itemsize * 8
            self.scale_bytes[k] = 0
            if info.scale_key is not None:
                with safe_open(info.scale_file, "pt") as f:
                    scale = f.get_tensor(info.scale_key)
                with safe_open(info.file, "pt") as f:
                    codes = f.get_tensor(info.disk_key)
                self.scale_bytes[k] = sum(stored[q][1].nbytes for q in info.quant_keys)
                self.raw[k] = (codes, scale, info.granularity)

    def box_bytes(self, key: str, lengths: tuple[int, ...], offsets: tuple[int, ...] | None = None) -> int:
        """Stored bytes of a box: its rows times each row's code span (a packed row's span may
        start and end inside a byte)."""
        if not math.prod(lengths):
            return 0
        rows, cols = math.prod(lengths[:-1]), lengths[-1]
        c0 = 0 if offsets is None else offsets[-1]
        bits = self.bits[key]
        return rows * (-(-(c0 + cols) * bits // 8) - c0 * bits // 8)

    def data_bytes(self, key: str) -> int:
        return self.box_bytes(key, tuple(self.full[key].shape))


def expected_box(shape, mesh_shape, coord, placements) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """This rank's ``(offsets, lengths)`` by torch's chunking rule, mesh dimension by mesh
    dimension: a dim of current length ``n`` split over ``k`` ranks gives rank ``i`` the range
    ``[i * c, min((i + 1) * c, n))`` with ``c = ceil(n / k)`` (empty past the end); a dim split
    again by a later mesh dimension is split within the previous chunk."""
    offsets, lengths = [0] * len(shape), list(shape)
    # A strided shard ("SS<d>": FSDP2 over TP) splits what the plain shards of the same dim on
    # later mesh dims leave: apply it after them.
    order = sorted(range(len(placements)), key=lambda i: placements[i].startswith("SS"))
    for i in order:
        size, c, p = mesh_shape[i], coord[i], placements[i]
        if p == "R":
            continue
        d = int(p.lstrip("S"))
        chunk = -(-lengths[d] // size)
        start = min(c * chunk, lengths[d])
        n = max(0, min(lengths[d], start + chunk) - start)
        offsets[d] += start
        lengths[d] = n
    return tuple(offsets), tuple(lengths)


def expected_bytes(ckpt: Checkpoint, tensors: dict) -> int:
    """Bytes a rank must have read: the stored bytes of each local box, and the whole scale of
    each FP8 tensor whose box is not empty (read once per tensor)."""
    total = 0
    for key, rec in tensors.items():
        if rec["placements"] is None:
            offsets, lengths = None, tuple(rec["shape"])
        else:
            offsets, lengths = expected_box(rec["shape"], rec["mesh_shape"], rec["coord"], rec["placements"])
        n = math.prod(lengths)
        total += ckpt.box_bytes(key, lengths, offsets) + (ckpt.scale_bytes[key] if n else 0)
    return total


def check_slices(records: list[dict], scenario: str, ckpt: Checkpoint, dtype=None) -> None:
    """On every rank, every tensor equals the matching slice of the single-process tensor, bit
    for bit, and lazyfp8's box equals the expected box."""
    for rank, rec in enumerate(records):
        res = rec[scenario]
        assert "error" not in res, f"rank {rank}:\n{res['error']}"
        assert res["tensors"], scenario
        for key, t in res["tensors"].items():
            full = ckpt.full[key]
            want_dtype = dtype or full.dtype
            assert t["local"].dtype == want_dtype, (rank, key)
            if t["placements"] is None:
                assert torch.equal(bits(t["local"]), bits(full.to(want_dtype))), (rank, key)
                continue
            assert all(p == "R" or p.lstrip("S").isdigit() for p in t["placements"]), t["placements"]
            offsets, lengths = expected_box(t["shape"], t["mesh_shape"], t["coord"], t["placements"])
            assert tuple(t["local"].shape) == lengths, (rank, key, t["placements"])
            if math.prod(lengths):  # torch places an empty shard at the end; its offset is moot
                assert tuple(map(tuple, t["box"])) == (offsets, lengths), (rank, key, t["placements"])
            index = tuple(slice(o, o + n) for o, n in zip(offsets, lengths))
            want = full[index].to(want_dtype)
            assert torch.equal(bits(t["local"]), bits(want)), (rank, key, t["placements"], offsets, lengths)


def check_bytes(records: list[dict], scenario: str, ckpt: Checkpoint) -> None:
    for rank, rec in enumerate(records):
        res = rec[scenario]
        assert "error" not in res, f"rank {rank}:\n{res['error']}"
        assert res["bytes_read"] == expected_bytes(ckpt, res["tensors"]), (rank, scenario)


def build_checkpoints(root: Path) -> dict[str, Checkpoint]:
    """The model's checkpoint and one per scheme, under ``root``, with their references."""
    out: dict[str, Checkpoint] = {}
    # The model: bf16 with N(0, 0.05) everywhere (norm included), 128x128 blocks, several files.
    g = torch.Generator().manual_seed(0)
    model = Tiny().to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lazyfp8.save(model, root / "model", scheme=PerBlock((128, 128)), config={}, max_shard_size=60_000)
    out["model"] = Checkpoint(str(root / "model"))
    # The scheme checkpoints: rows of very different magnitudes, so every scale matters.
    sd = {}
    for key, shape in SHAPES.items():
        t = torch.randn(shape, generator=g) * 0.05
        if len(shape) >= 2:
            t = t * torch.logspace(-2, 2, math.prod(shape[:-1])).reshape(*shape[:-1], 1)
        sd[key] = t if key.endswith(FP8_KEYS) else t.to(torch.bfloat16)
    for name, kwargs in SCHEMES.items():
        kwargs = dict(kwargs)
        keys = kwargs.pop("keys", FP8_KEYS)
        lazyfp8.save(sd, root / name, quantize=lambda k, keys=keys: k.endswith(keys), exclude=(), max_shard_size=150_000, **kwargs)
        out[name] = Checkpoint(str(root / name), key_mapping=KEY_MAPPING)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Checkpoint]:
    return build_checkpoints(tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w}ranks")
def run(request, ckpts, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    t0 = time.perf_counter()
    records = _launch(world, {k: c.path for k, c in ckpts.items()}, out_dir)
    print(f"\n{world} ranks: all scenarios in {time.perf_counter() - t0:.1f} s")
    return world, records


@pytest.fixture(scope="module")
def run_cuda(ckpts, tmp_path_factory) -> tuple[int, list[dict]]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out_dir = tmp_path_factory.mktemp("cuda")
    return 2, _launch(2, {k: c.path for k, c in ckpts.items()}, out_dir, device="cuda")


def _needs_4(world: int, scenario: str) -> None:
    if scenario in SCENARIOS_4 and world != 4:
        pytest.skip("needs a 2-D mesh (4 ranks)")


# ------------------------------------------------------------------------------------------------
# The references themselves
# ------------------------------------------------------------------------------------------------
def test_single_process_reference_is_the_reference_formula(ckpts):
    """The single-process view every rank is compared with equals the reference dequantization
    of the stored codes and scales (tests.builders.expected), for every scheme."""
    blocks = {"block128": (128, 128), "mx_ue8m0": (1, 32), "model": (128, 128)}
    for name, ckpt in ckpts.items():
        assert ckpt.raw, name
        for key, (codes, scale, granularity) in ckpt.raw.items():
            if name in PACKED:
                want = packed_reference(ckpt, name, key, codes, scale)
            else:
                want = reference_dequant(codes, scale, torch.bfloat16, blocks.get(name))
            assert torch.equal(bits(ckpt.full[key]), bits(want)), (name, key, granularity)
    assert {ckpts[s].raw["layers.0.up.weight"][2] for s in SCHEMES} == {
        PerTensor(), PerChannel(), PerBlock((128, 128)), PerBlock((1, 32)), PerBlock((1, 16))
    }
    assert ckpts["per_tensor"].raw["layers.0.up.weight"][1].shape == ()
    assert ckpts["mx_ue8m0"].raw["layers.0.up.weight"][1].dtype == torch.uint8


def packed_reference(ckpt: Checkpoint, name: str, key: str, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A packed weight by its format's formula (tests/test_packed.py's ``expected``), from its
    stored codes, scale and global scale."""
    from tests.test_packed import expected

    nibbles = codes.contiguous().view(torch.uint8)
    nibbles = torch.stack((nibbles & 0xF, nibbles >> 4), dim=-1).flatten(-2)
    if name == "int4":
        return expected(nibbles, INT4.values(), scale, 32, torch.bfloat16)
    if name == "mxfp4":
        return expected(nibbles, E2M1.values(), torch.exp2(scale.to(torch.float32) - 127), 32, torch.bfloat16)
    info = LazyFP8View(ckpt.path, key_mapping=KEY_MAPPING).info(key)
    with safe_open(info.file, "pt") as f:
        g = f.get_tensor(next(q for q in info.quant_keys if q.endswith("global_scale")))
    return expected(nibbles, E2M1.values(), scale, 16, torch.bfloat16, global_scale=g, divide=True)


def test_expected_box_follows_torch_chunking():
    # 301 rows over 4 ranks: 76, 76, 76, 73; 3 rows over 4: 1, 1, 1, 0 (the empty shard at the end)
    assert [expected_box((301, 7), (4,), (r,), ("S0",)) for r in range(4)] == [
        ((0, 0), (76, 7)), ((76, 0), (76, 7)), ((152, 0), (76, 7)), ((228, 0), (73, 7))
    ]
    assert [expected_box((3,), (4,), (r,), ("S0",))[1] for r in range(4)] == [(1,), (1,), (1,), (0,)]
    # dim 0 split by both mesh dims: within the first split's chunk
    assert expected_box((260, 4), (2, 2), (1, 1), ("S0", "S0")) == ((195, 0), (65, 4))
    assert expected_box((9, 10), (2, 2), (1, 0), ("R", "S1")) == ((0, 0), (9, 5))
    # FSDP2 over TP, (_StridedShard(0), Shard(0)) on (dp, tp): the TP chunk, then its FSDP2 chunk
    # (what torch's compute_local_shape_and_global_offset gives: rows 150..224 at dp 0, tp 1)
    assert expected_box((300, 2), (2, 2), (0, 1), ("SS0", "S0")) == ((150, 0), (75, 2))
    assert [expected_box((301, 2), (2, 2), (d, t), ("SS0", "S0")) for d in (0, 1) for t in (0, 1)] == [
        ((0, 0), (76, 2)), ((151, 0), (75, 2)), ((76, 0), (75, 2)), ((226, 0), (75, 2))
    ]


# ------------------------------------------------------------------------------------------------
# 1. FSDP2
# ------------------------------------------------------------------------------------------------
FSDP_SCENARIOS = [
    "fsdp_meta_load_state_dict",
    "fsdp_meta_load_into",
    "fsdp_cpu_load_state_dict",
    "fsdp_columns_load_state_dict",  # shard_placement_fn: Shard(1) for the matrices
]


@pytest.mark.parametrize("scenario", FSDP_SCENARIOS)
def test_fsdp2_every_rank_holds_its_slice_bit_exact(run, ckpts, scenario):
    world, records = run
    check_slices(records, scenario, ckpts["model"])
    for rec in records:
        res = rec[scenario]
        assert res["incompatible"] == ([], [])
        assert set(res["tensors"]) == set(ckpts["model"].full)
        columns = "columns" in scenario
        for t in res["tensors"].values():
            assert t["placements"] == (("S1",) if columns and len(t["shape"]) == 2 else ("S0",))
    if world == 4 and "columns" not in scenario:  # the shapes do what the test is about: an uneven last shard, an empty one
        embed = [rec[scenario]["tensors"]["embed.weight"]["local"].shape[0] for rec in records]
        head = [rec[scenario]["tensors"]["head.weight"]["local"].shape[0] for rec in records]
        assert embed == [76, 76, 76, 73] and head == [1, 1, 1, 0]


@pytest.mark.parametrize("scenario", FSDP_SCENARIOS)
def test_fsdp2_forward_matches_the_single_process_model(run, ckpts, scenario):
    """The weights FSDP2 all-gathers in forward are the loaded ones (for load_into, FSDP2's lazy
    init re-pads the loaded shards first)."""
    _world, records = run
    model = Tiny().to(torch.bfloat16)
    lazyfp8.load_into(model, ckpts["model"].path)
    with torch.no_grad():
        want = model(IDS)
    for rank, rec in enumerate(records):
        assert "error" not in rec[scenario], rec[scenario]["error"]
        torch.testing.assert_close(rec[scenario]["output"], want, msg=lambda m, rank=rank: f"rank {rank}: {m}")


def test_fsdp2_meta_parameters_are_refused_before_reading(run):
    _world, records = run
    for rec in records:
        res = rec["fsdp_meta_refused"]
        assert "error" not in res, res.get("error")
        assert res["raised"] is not None and "to_empty" in res["raised"]
        assert res["bytes_read"] == 0


# ------------------------------------------------------------------------------------------------
# 2. Tensor parallel
# ------------------------------------------------------------------------------------------------
def test_tp_parallelize_module_every_rank_holds_its_slice(run, ckpts):
    _world, records = run
    check_slices(records, "tp_module", ckpts["model"])
    placements = {k: t["placements"] for k, t in records[0]["tp_module"]["tensors"].items()}
    assert placements == {
        "embed.weight": ("S0",),
        "up.weight": ("S0",),
        "down.weight": ("S1",),
        "down.bias": ("R",),
        "norm.weight": None,
        "norm.bias": None,
        "head.weight": None,
    }


def test_tp_forward_matches_the_single_process_model(run, ckpts):
    _world, records = run
    model = Tiny().to(torch.bfloat16)
    lazyfp8.load_into(model, ckpts["model"].path)
    with torch.no_grad():
        want = model(IDS)
    for rank, rec in enumerate(records):
        assert "error" not in rec["tp_module"], rec["tp_module"]["error"]
        # TP sums partial products in another order: close, not bit-equal
        torch.testing.assert_close(rec["tp_module"]["output"], want, msg=lambda m, rank=rank: f"rank {rank}: {m}")


@pytest.mark.parametrize("dims", [1, 2], ids=["1d_mesh", "2d_mesh"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_tp_dtensor_dict_every_rank_holds_its_slice(run, ckpts, scheme, dims):
    world, records = run
    scenario = f"tp_dict_{dims}d_{scheme}"
    _needs_4(world, scenario)
    check_slices(records, scenario, ckpts[scheme])


# ------------------------------------------------------------------------------------------------
# 3. torch.distributed.checkpoint
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [1, 2], ids=["1d_mesh", "2d_mesh"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_dcp_load_every_rank_holds_its_slice(run, ckpts, scheme, dims):
    world, records = run
    scenario = f"dcp_{dims}d_{scheme}"
    _needs_4(world, scenario)
    check_slices(records, scenario, ckpts[scheme])


def test_dcp_load_into_an_fsdp2_state_dict(run, ckpts):
    _world, records = run
    check_slices(records, "dcp_fsdp", ckpts["model"])


# ------------------------------------------------------------------------------------------------
# 4. Bytes read
# ------------------------------------------------------------------------------------------------
BYTES_SCENARIOS = [
    *FSDP_SCENARIOS,
    "tp_module",
    "dcp_fsdp",
    *(f"tp_dict_{d}d_{s}" for d in (1, 2) for s in SCHEMES),
    *(f"dcp_{d}d_{s}" for d in (1, 2) for s in SCHEMES),
]


@pytest.mark.parametrize("scenario", BYTES_SCENARIOS)
def test_each_rank_reads_exactly_its_boxes_and_the_scales(run, ckpts, scenario):
    """``bytes_read`` on each rank = stored bytes of its local boxes (a replicated or plain
    tensor: all of it) + each FP8 tensor's whole scale, read once, when its box is not empty."""
    world, records = run
    _needs_4(world, scenario)
    kwargs = ALL_SCENARIOS[scenario][1]
    check_bytes(records, scenario, ckpts[kwargs.get("scheme", "model")])


@pytest.mark.parametrize("scenario", ["fsdp_meta_load_state_dict", "dcp_fsdp"])
def test_fsdp2_ranks_read_one_nth_of_the_data_between_them(run, ckpts, scenario):
    """Under FSDP2 every tensor is sharded: the ranks' data reads partition the checkpoint (each
    stored byte read by exactly one rank, each rank at most ceil(rows / N) rows of each tensor),
    and only the scales are read by more than one rank."""
    world, records = run
    ckpt = ckpts["model"]
    total = sum(ckpt.data_bytes(k) for k in ckpt.full)
    per_rank_bound = sum(
        -(-ckpt.full[k].shape[0] // world) * math.prod(ckpt.full[k].shape[1:]) * (ckpt.bits[k] // 8) for k in ckpt.full
    )
    data = []
    for rec in records:
        res = rec[scenario]
        scales = sum(ckpt.scale_bytes[k] for k, t in res["tensors"].items() if t["local"].numel())
        data.append(res["bytes_read"] - scales)
    assert sum(data) == total
    assert max(data) <= per_rank_bound < total  # about 1/N each
    assert per_rank_bound <= total / world + sum(math.prod(t.shape[1:]) * (ckpt.bits[k] // 8) for k, t in ckpt.full.items())


# ------------------------------------------------------------------------------------------------
# Limitations
# ------------------------------------------------------------------------------------------------
def test_fsdp2_over_tp_never_loads_wrong_values(run, ckpts):
    """FSDP2 over TP places ``up.weight`` as ``(_StridedShard(0), Shard(0))``. Whatever lazyfp8
    supports, it must not load wrong rows: either it refuses the placement by name, or every
    rank holds exactly its rows."""
    world, records = run
    _needs_4(world, "fsdp_over_tp")
    for rec in records:
        res = rec["fsdp_over_tp"]
        assert "error" not in res, res.get("error")
        assert res["placements"]["up.weight"] == ("SS0", "S0")  # what the scenario is about
        assert res["placements"]["down.weight"] == ("S0", "S1")
        if res["raised"] is not None:
            assert "not supported" in res["raised"] and "_S(0" in res["raised"], res["raised"]
    if all(rec["fsdp_over_tp"]["raised"] is None for rec in records):
        check_slices(records, "fsdp_over_tp", ckpts["model"])


def test_fsdp2_over_tp_loads_bit_exact(run, ckpts):
    world, records = run
    _needs_4(world, "fsdp_over_tp")
    for rank, rec in enumerate(records):
        res = rec["fsdp_over_tp"]
        assert "error" not in res, res.get("error")
        assert res["raised"] is None, f"rank {rank}: {res['raised'][:300]}"
    check_slices(records, "fsdp_over_tp", ckpts["model"])
    check_bytes(records, "fsdp_over_tp", ckpts["model"])
    for rec in records:
        for key, full in rec["fsdp_over_tp"]["full"].items():
            assert torch.equal(bits(full), bits(ckpts["model"].full[key])), key


# ------------------------------------------------------------------------------------------------
# CUDA shards (only where a GPU is present; every rank on the one GPU)
# ------------------------------------------------------------------------------------------------
_CUDA_DCP_PER_TENSOR_BUG = pytest.mark.xfail(
    strict=False,
    reason="bug (CUDA only, not minimized): under dcp.load on 2 ranks sharing one GPU, rank 0's box "
    "of layers.0.experts.weight (per-tensor scale, Shard(1), rows 0..99 of each expert) comes out "
    "wrong; seen in 5 of 5 runs on an H200 (torch 2.11), gone under CUDA_LAUNCH_BLOCKING=1, and a "
    "single process replaying the same read_box calls gets the right bits: a stream-ordering race",
)


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(s, marks=_CUDA_DCP_PER_TENSOR_BUG) if s == "cuda_dcp_1d_per_tensor" else s
        for s in SCENARIOS_CUDA
    ],
)
def test_cuda_shards_every_rank_holds_its_slice_and_reads_its_boxes(run_cuda, ckpts, scenario):
    _world, records = run_cuda
    ckpt = ckpts[ALL_SCENARIOS[scenario][1]["scheme"]]
    check_slices(records, scenario, ckpt)
    check_bytes(records, scenario, ckpt)
    for rec in records:
        devices = {t["device"] for t in rec[scenario]["tensors"].values() if t["placements"] is not None}
        assert devices == {"cuda"}



