"""load_into / from_pretrained with a device_map: accelerate's planner, "cpu" and "disk" offload
through accelerate's own offload format and hooks, on a CPU-only machine with fake budgets
(accelerator ids cannot be tested here: a dict map of "cpu" and "disk", and the planners with
max_memory={"cpu": ...} so what does not fit goes to disk)."""

import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate.utils import compute_module_sizes, load_offloaded_weight  # noqa: E402

import lazyfp8  # noqa: E402
from lazyfp8 import init_empty_weights, load_into  # noqa: E402
from lazyfp8.testing import write_checkpoint as write_fp8  # noqa: E402
from tests.helpers import bits  # noqa: E402
from tests.test_pretrained import build_llama, memory_checkpoint, peak_above_params  # noqa: E402

MiB = 1 << 20
IDS = torch.tensor([[1, 5, 9, 200, 3, 77]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tied Llama's FP8 checkpoint and the logits of the fully loaded model."""
    path = build_llama(str(tmp_path_factory.mktemp("llama")), tie=True)
    full = lazyfp8.from_pretrained(transformers.LlamaForCausalLM, path)
    with torch.no_grad():
        logits = full(input_ids=IDS).logits
    return path, full, logits


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def offloaded(folder):
    """accelerate's offload folder as {name: tensor}, read with accelerate's own reader."""
    index = json.loads(open(os.path.join(folder, "index.json")).read())
    assert sorted(os.listdir(folder)) == sorted(["index.json", *(f"{k}.dat" for k in index)])
    return {k: load_offloaded_weight(os.path.join(folder, f"{k}.dat"), info) for k, info in index.items()}


DISK_LAYER = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


@pytest.mark.parametrize("where", ["a layer on disk", "everything on disk", "head and embeddings on disk"])
def test_dict_map_allocates_in_memory_writes_disk_and_runs_bit_exact(llama, tmp_path, where):
    path, full, want = llama
    device_map = {
        "a layer on disk": DISK_LAYER,
        "everything on disk": {"": "disk"},
        # tied: both names are offloaded, each in its own file, as accelerate's hooks look them up
        "head and embeddings on disk": {**DISK_LAYER, "model.layers.1": "cpu", "model.embed_tokens": "disk", "lm_head": "disk"},
    }[where]
    model = lazyfp8.from_pretrained(transformers.LlamaForCausalLM, path, device_map=device_map, offload_folder=tmp_path)
    assert model.hf_device_map == device_map
    on_disk = offloaded(tmp_path)
    reference = dict(full.named_parameters(remove_duplicate=False))
    expected_disk = {k for k in reference if any(d == "disk" and (m == "" or k.startswith(m + ".")) for m, d in device_map.items())}
    assert set(on_disk) == expected_disk
    for key, value in on_disk.items():
        assert torch.equal(bits(value), bits(reference[key])), key  # dequantized, the model's dtype
    for name, p in model.named_parameters():
        assert p.is_meta == (name in expected_disk), name
        if not p.is_meta:
            assert torch.equal(bits(p), bits(reference[name])), name
    assert torch.equal(bits(logits(model)), bits(want))


@pytest.mark.parametrize("planner", ["auto", "balanced", "sequential"])
def test_accelerates_planner_splits_a_fake_budget_across_cpu_and_disk(llama, tmp_path, planner):
    path, _, want = llama
    with torch.device("meta"):
        total = compute_module_sizes(transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(path)).to(torch.bfloat16))[""]
    model = lazyfp8.from_pretrained(
        transformers.LlamaForCausalLM, path, device_map=planner, max_memory={"cpu": int(total * 0.8)}, offload_folder=tmp_path
    )
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    in_memory = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters() if not p.is_meta}.values())
    assert 0 < in_memory <= total * 0.8
    assert offloaded(tmp_path)
    assert torch.equal(bits(logits(model)), bits(want))


def test_load_into_a_model_built_on_meta_with_a_map(llama, tmp_path):
    # (.to(bfloat16) makes the rotary tables bfloat16 too, unlike from_pretrained's dtype context:
    # the reference is built the same way, for real)
    path = llama[0]
    config = transformers.AutoConfig.from_pretrained(path)
    full = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    load_into(full, path)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.tie_weights()
    result = load_into(model, path, device_map=DISK_LAYER, offload_folder=tmp_path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert model.model.rotary_emb.inv_freq.dtype == torch.bfloat16  # re-created by the model's initializer
    assert torch.equal(bits(model.model.rotary_emb.inv_freq), bits(full.model.rotary_emb.inv_freq))
    assert torch.equal(bits(logits(model.eval())), bits(logits(full)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(3))
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 40, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x))


def test_a_plain_module_with_a_dict_map(tmp_path):
    torch.manual_seed(0)
    write_fp8(Net().to(torch.bfloat16).state_dict(), tmp_path / "ckpt", quantize=r"blocks\.\d+\.\d\.weight$")
    full = Net().to(torch.bfloat16)
    load_into(full, tmp_path / "ckpt")
    with init_empty_weights():
        model = Net().to(torch.bfloat16)
    device_map = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "disk", "norm": "cpu", "head": "cpu"}
    load_into(model, tmp_path / "ckpt", device_map=device_map, offload_folder=tmp_path / "off")
    assert model.blocks[1][0].weight.is_meta and not model.blocks[0][0].weight.is_meta
    assert set(offloaded(tmp_path / "off")) == {f"blocks.{i}.{j}.{w}" for i in (1, 2) for j in (0, 2) for w in ("weight", "bias")}
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(bits(model(ids)), bits(full(ids)))


# --- refused before anything is read ----------------------------------------------------------


@pytest.fixture
def no_reads(monkeypatch):
    import lazyfp8.storage.reader

    monkeypatch.setattr(lazyfp8.storage.reader.ShardFile, "read_into", lambda *a, **k: pytest.fail("read data"))


def meta_llama(path):
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(path))
    model.tie_weights()
    return model


def test_disk_without_an_offload_folder(llama, no_reads):
    with pytest.raises(ValueError, match=r"device_map sends model.layers.1 to 'disk': pass offload_folder"):
        load_into(meta_llama(llama[0]), llama[0], device_map=DISK_LAYER)


def test_a_map_that_places_nothing_for_some_tensors(llama, no_reads):
    device_map = {k: v for k, v in DISK_LAYER.items() if k != "model.norm"}
    with pytest.raises(ValueError, match=r"places no module holding 1 tensor\(s\) \(model.norm.weight\)"):
        load_into(meta_llama(llama[0]), llama[0], device_map=device_map)


def test_options_that_do_not_go_together(llama, no_reads):
    path = llama[0]
    with pytest.raises(TypeError, match="pass device or device_map, not both"):
        load_into(meta_llama(path), path, device="cpu", device_map={"": "cpu"})
    with pytest.raises(TypeError, match="apply only with a device_map"):
        load_into(meta_llama(path), path, offload_folder="x")
    with pytest.raises(ValueError, match="device_map must be a dict or one of 'auto'"):
        load_into(meta_llama(path), path, device_map="everywhere")


# --- memory: a disk-offloaded load holds one tensor at a time ---------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
def test_peak_memory_with_half_the_layers_on_disk(tmp_path):
    """A 64 MiB (BF16) model with two of its three layers on disk (40 MiB written): above what
    stays in memory, one tensor read for its offload file (4 MiB), accelerate's mapped pages of
    that file, the allocator's keep: measured 12.0 MiB on the 2-core dev box."""
    path = memory_checkpoint(str(tmp_path))
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    r = peak_above_params(tmp_path, path, device_map=device_map, offload_folder=str(tmp_path / "off"))
    print(f"\npeak above the {r['in_memory'] / MiB:.0f} MiB in memory: {r['peak_above'] / MiB:.1f} MiB (largest tensor {r['largest'] / MiB:.0f} MiB)")
    assert 20 * MiB < r["in_memory"] < 30 * MiB  # embeddings (tied head) and one layer
    assert r["peak_above"] < 5 * r["largest"] < 40 * MiB  # never the offloaded layers at once


@pytest.mark.skipif(torch.accelerator.is_available(), reason="an accelerator is present")
def test_an_accelerator_index_without_an_accelerator(llama, no_reads):
    with pytest.raises(ValueError, match=r"device_map puts 'model.layers.1' on 0, which is not a device here"):
        load_into(meta_llama(llama[0]), llama[0], device_map={**DISK_LAYER, "model.layers.1": 0})
