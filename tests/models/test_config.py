"""DecoderConfig <-> transformers configs: round trips per family and clear errors for
architectures and options kdjax does not implement."""

import pytest
import transformers

from kdjax.models import DecoderConfig
from tests.models.conftest import BASE, CASES


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_through_transformers(name):
    cls_name, kw = CASES[name]
    hf = getattr(transformers, cls_name)(**BASE, **kw)
    cfg = DecoderConfig.from_hf(hf)
    assert cfg.num_kv_heads == hf.num_key_value_heads
    assert cfg.head_dim == getattr(hf, "head_dim", None) or hf.hidden_size // 4
    back = cfg.to_hf()
    assert type(back) is type(hf)
    assert DecoderConfig.from_hf(back) == cfg
    assert DecoderConfig.from_hf(hf.to_dict()) == cfg  # plain dicts work too
    assert hash(cfg) == hash(DecoderConfig.from_hf(back))  # usable as a static jit arg


def test_family_specific_fields():
    qwen2 = DecoderConfig.from_hf(transformers.Qwen2Config(**BASE, num_key_value_heads=2))
    assert qwen2.attention_bias and not qwen2.attention_out_bias and not qwen2.qk_norm
    qwen3 = DecoderConfig.from_hf(transformers.Qwen3Config(**BASE, num_key_value_heads=2))
    assert qwen3.qk_norm and not qwen3.attention_bias
    llama3 = DecoderConfig.from_hf(transformers.LlamaConfig(**BASE, **CASES[
        "llama3_rope_bias"][1]))
    assert llama3.rope_theta == 500000.0 and llama3.rope_scaling["rope_type"] == "llama3"
    assert llama3.attention_bias and llama3.attention_out_bias
    mistral = DecoderConfig.from_hf(transformers.MistralConfig(**BASE, num_key_value_heads=2,
                                                              sliding_window=7))
    assert mistral.sliding_window == 7
    with pytest.raises(TypeError, match="read-only"):
        llama3.rope_scaling["factor"] = 2.0


@pytest.mark.parametrize("cls_name,kw,match", [
    ("GPT2Config", {}, "model_type='gpt2'"),
    ("LlamaConfig", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("LlamaConfig", dict(mlp_bias=True), "mlp_bias"),
    ("LlamaConfig", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)),
     "rope_type='yarn'"),
    ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
     "layer_types"),
])
def test_unsupported_options_are_named(cls_name, kw, match):
    base = {} if cls_name == "GPT2Config" else {**BASE, "num_key_value_heads": 2}
    hf = getattr(transformers, cls_name)(**base, **kw)
    with pytest.raises(ValueError, match=match):
        DecoderConfig.from_hf(hf)


def test_partial_rotary_is_refused():
    hf = transformers.LlamaConfig(**BASE).to_dict()
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4,
                             "partial_rotary_factor": 0.5}
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        DecoderConfig.from_hf(hf)


@pytest.mark.parametrize("change,match", [
    (dict(family="llama", qk_norm=True), "qk_norm"),
    (dict(family="qwen2", attention_bias=False), "attention_bias"),
    (dict(family="llama", attention_bias=True, attention_out_bias=False), "attention_out_bias"),
    (dict(family="llama", sliding_window=16), "sliding_window"),
])
def test_export_refuses_configs_the_family_cannot_express(change, match):
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=4, **change)
    with pytest.raises(ValueError, match=match):
        cfg.to_hf()
