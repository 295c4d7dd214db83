import pytest
import torch
from torch import nn

import lazyfp8
from lazyfp8 import LazyFP8View, init_empty_weights, load_into
from lazyfp8.testing import write_checkpoint
from tests.helpers import bits


class Tiny(nn.Module):
    def __init__(self, tie: bool = True):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50, bias=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)
        if tie:
            self.head.weight = self.embed.weight


def quantized(key: str) -> bool:
    return key.startswith("body.") and key.endswith("weight")


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    src = Tiny(tie=True).to(torch.bfloat16)
    sd = {k: v for k, v in src.state_dict().items() if k != "head.weight"}  # tied: stored once
    write_checkpoint(sd, tmp_path, quantize=quantized, max_shard_size=1000)  # a few shards
    return str(tmp_path)


def test_meta_model_is_materialized_once_and_ties_survive(ckpt):
    with init_empty_weights():
        model = Tiny().to(torch.bfloat16)
    assert model.embed.weight.is_meta and not model.inv_freq.is_meta
    result = load_into(model, ckpt)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert model.head.weight is model.embed.weight and isinstance(model.embed.weight, nn.Parameter)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    view = LazyFP8View(ckpt)
    for k in view:
        assert torch.equal(bits(model.state_dict()[k]), bits(view.get_tensor(k))), k


def test_same_bits_as_load_state_dict_on_a_real_model(ckpt):
    view = LazyFP8View(ckpt)
    a = Tiny().to(torch.float32)
    b = Tiny().to(torch.float32)
    load_into(a, view)
    b.load_state_dict(view, strict=False)
    for k, v in a.state_dict().items():
        assert torch.equal(bits(v), bits(b.state_dict()[k])), k
    assert a.head.weight is a.embed.weight


def test_requires_grad_is_kept(ckpt):
    with init_empty_weights():
        model = Tiny().to(torch.bfloat16)
    model.norm.weight.requires_grad_(False)
    load_into(model, ckpt)
    assert not model.norm.weight.requires_grad and model.body[0].weight.requires_grad


def test_strict_reports_missing_and_unexpected_before_reading(ckpt, monkeypatch):
    monkeypatch.setattr(lazyfp8.storage.reader.ShardFile, "read_into", lambda *a: pytest.fail("read data"))
    model = Tiny(tie=False).to(torch.bfloat16)
    model.extra = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "head.weight", "extra.weight"'):
        load_into(model, ckpt)


def test_non_strict_returns_the_lists(ckpt):
    model = Tiny(tie=False).to(torch.bfloat16)
    del model.norm
    result = load_into(model, ckpt, strict=False)
    assert result.missing_keys == ["head.weight"]
    assert sorted(result.unexpected_keys) == ["norm.bias", "norm.weight"]


def test_shape_mismatch_always_raises(ckpt):
    model = Tiny().to(torch.bfloat16)
    model.body[0] = nn.Linear(16, 33)
    with pytest.raises(RuntimeError, match="size mismatch for body.0.weight"):
        load_into(model, ckpt, strict=False)


def test_meta_buffers_left_behind_are_an_error(ckpt):
    with torch.device("meta"):
        model = Tiny().to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="inv_freq.*init_empty_weights"):
        load_into(model, ckpt)


def test_accepts_a_plain_dict(ckpt):
    view = LazyFP8View(ckpt)
    sd = {k: view.get_tensor(k) for k in view}
    with init_empty_weights():
        model = Tiny().to(torch.bfloat16)
    load_into(model, sd)
    assert torch.equal(model.embed.weight, sd["embed.weight"])


def test_view_options_only_with_a_path(ckpt):
    with pytest.raises(TypeError, match="only when source is a path"):
        load_into(Tiny(), LazyFP8View(ckpt), dtype=torch.float16)


def test_path_with_view_options(ckpt):
    with init_empty_weights():
        model = Tiny().to(torch.float16)
    load_into(model, ckpt, dtype=torch.float16)
    assert model.body[0].weight.dtype == torch.float16


def test_init_empty_weights_is_scoped_to_its_thread():
    """A model built in another thread while one thread is inside the context gets real
    parameters; the patch is gone once the last context exits, even after an error."""
    import threading

    from torch import nn

    original = nn.Module.register_parameter
    inside, outside_done = threading.Event(), threading.Event()
    built = {}

    def outside():
        inside.wait(5)
        built["outside"] = nn.Linear(4, 4)
        outside_done.set()

    t = threading.Thread(target=outside)
    t.start()
    with init_empty_weights():
        inside.set()
        assert outside_done.wait(5)
        built["inside"] = nn.Linear(4, 4)
        with init_empty_weights():  # nesting
            built["nested"] = nn.Linear(2, 2)
        built["after_nested"] = nn.Linear(2, 2)
    t.join(5)
    assert built["outside"].weight.device.type == "cpu"
    assert built["inside"].weight.is_meta and built["nested"].weight.is_meta and built["after_nested"].weight.is_meta
    assert nn.Module.register_parameter is original
    with pytest.raises(ZeroDivisionError), init_empty_weights():
        raise ZeroDivisionError
    assert nn.Module.register_parameter is original
    assert nn.Linear(2, 2).weight.device.type == "cpu"


def test_init_empty_weights_concurrent_contexts_in_threads():
    """Two threads entering and leaving overlapping contexts: each builds meta parameters inside,
    real ones outside, and the last exit restores the original."""
    import threading

    from torch import nn

    original = nn.Module.register_parameter
    barrier = threading.Barrier(2)
    results, errors = [], []

    def worker(delay_exit: bool):
        try:
            for _ in range(20):
                barrier.wait(5)
                with init_empty_weights():
                    m = nn.Linear(3, 3)
                    barrier.wait(5)
                    if delay_exit:
                        barrier.wait(5)  # the other thread has left its context by now
                        m2 = nn.Linear(3, 3)
                    else:
                        m2 = nn.Linear(3, 3)
                if not delay_exit:
                    barrier.wait(5)
                results.append((m.weight.is_meta, m2.weight.is_meta, nn.Linear(1, 1).weight.is_meta))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(d,)) for d in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert results and all(r == (True, True, False) for r in results)
    assert nn.Module.register_parameter is original
