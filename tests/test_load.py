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


# --- a transformers model built on meta: its non-persistent buffers re-created -----------------


def llama_on_meta_and_built(tmp_path, rope):
    """A Llama's FP8 checkpoint, the model built under torch.device("meta") (as transformers
    builds it) and the same model built normally."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, rope_parameters=rope, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    built = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    sd = {k: v for k, v in built.state_dict().items() if k != "lm_head.weight"}
    write_checkpoint(sd, tmp_path, quantize=r"_proj\.weight$")
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    return meta, built


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
}  # fmt: skip


@pytest.mark.parametrize("rope", list(ROPES))
def test_transformers_model_built_on_meta_gets_its_rotary_tables_from_its_initializer(tmp_path, rope):
    meta, built = llama_on_meta_and_built(tmp_path, ROPES[rope])
    assert meta.model.rotary_emb.inv_freq.is_meta
    result = load_into(meta, tmp_path)  # strict: nothing is left on meta
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name in ("inv_freq", "original_inv_freq"):
        ours, theirs = getattr(meta.model.rotary_emb, name), getattr(built.model.rotary_emb, name)
        assert ours.dtype == theirs.dtype and torch.equal(bits(ours), bits(theirs)), name
    assert meta.model.rotary_emb.attention_scaling == built.model.rotary_emb.attention_scaling
    view = LazyFP8View(tmp_path)
    for k in view:  # loaded tensors untouched by the initializer
        assert torch.equal(bits(meta.state_dict()[k]), bits(view.get_tensor(k))), k
    assert meta.lm_head.weight is meta.model.embed_tokens.weight


def test_a_buffer_the_initializer_does_not_write_is_an_error(tmp_path):
    meta, _ = llama_on_meta_and_built(tmp_path, ROPES["default"])
    meta.model.register_buffer("mine", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(RuntimeError, match=r"left 1 non-persistent buffer\(s\) unset \(model.mine\).*init_empty_weights"):
        load_into(meta, tmp_path)


# --- logging: what is skipped, materialized, slow ---------------------------------------------


def test_skipped_keys_are_logged(ckpt, caplog):
    model = Tiny(tie=False).to(torch.bfloat16)
    del model.norm
    with caplog.at_level("INFO", logger="lazyfp8"):
        load_into(model, ckpt, strict=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings[0] == "skipped 2 key(s) of the checkpoint the model does not have: norm.weight, norm.bias"
    assert warnings[1] == "1 key(s) of the model are not in the checkpoint and were left as they are: head.weight"
    assert any(r.getMessage().startswith("loaded 6 tensor(s)") for r in caplog.records if r.levelname == "INFO")


def test_hidden_quantization_parameters_are_logged(tmp_path, caplog):
    torch.manual_seed(0)
    sd = {k: v for k, v in Tiny().to(torch.bfloat16).state_dict().items() if k != "head.weight"}
    write_checkpoint(sd, tmp_path, quantize=quantized, activation_scales=True)
    with init_empty_weights():
        model = Tiny().to(torch.bfloat16)
    with caplog.at_level("INFO", logger="lazyfp8"):
        load_into(model, tmp_path)
    assert (
        "skipped 2 quantization parameter(s) of quantized modules (static activation / KV-cache scales, e.g. "
        "body.0.activation_scale, body.2.activation_scale); LazyFP8View(..., include_quant_params=True) exposes them"
    ) in caplog.text


def test_materialized_values_are_logged(tmp_path, caplog):
    pytest.importorskip("transformers")
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import ConversionOps, WeightConverter

    class Doubled(ConversionOps):  # not a layout: the values change
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            (value,) = input_dict.values()
            return {target_patterns[0]: (value[0] if isinstance(value, list) else value) * 2}

        @property
        def reverse_op(self):
            return self

    register_checkpoint_conversion_mapping(
        "lazyfp8_test_logged", [WeightConverter("scaled.weight", "doubled.weight", operations=[Doubled()])], overwrite=True
    )
    write_checkpoint({"scaled.weight": torch.ones(4, 8)}, tmp_path, scheme=None, config={"model_type": "lazyfp8_test_logged"})
    model = nn.Module()
    model.doubled = nn.Linear(8, 4, bias=False)
    with caplog.at_level("INFO", logger="lazyfp8"):
        load_into(model, tmp_path, key_mapping="transformers")
    assert torch.equal(model.doubled.weight, torch.full((4, 8), 2.0))
    assert "materialized 1 value(s) whose key-mapping conversion is not a layout" in caplog.text
    assert "0.0 MiB for doubled.weight): doubled.weight" in caplog.text


def test_slow_tensors_are_named(ckpt, caplog, monkeypatch):
    monkeypatch.setattr(lazyfp8.load, "SLOW_TENSOR_SECONDS", 0.0)
    with init_empty_weights():
        model = Tiny().to(torch.bfloat16)
    with caplog.at_level("INFO", logger="lazyfp8"):
        load_into(model, ckpt)
    slow = [r.getMessage() for r in caplog.records if r.getMessage().startswith("slow: ")]
    assert len(slow) == 8 and any(m.startswith("slow: body.0.weight took ") and m.endswith(" GB/s)") for m in slow)
