"""Tiny random transformers models of every supported family, saved once per session and
loaded by kdjax; the torch copy is kept in float64 as the reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

VOCAB = 160
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (config class name, config kwargs). Together they cover untied/tied embeddings,
# GQA ratios 4:1, 2:1, 1:1, llama3 RoPE scaling, attention biases (q/k/v and o_proj),
# head_dim != hidden/heads, Mistral's sliding window and Qwen3's q/k norm.
CASES = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "llama_tied_mqa": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3_rope_bias": ("LlamaConfig", dict(
        num_key_value_heads=4, attention_bias=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, head_dim=16, sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16,
                                  rope_parameters=dict(rope_type="default",
                                                       rope_theta=1e6))),
}


@dataclasses.dataclass
class Family:
    name: str
    path: object  # directory with the saved float32 checkpoint
    torch_model: object  # float64, eager attention (so output_attentions works)
    model: object  # kdjax Decoder loaded from `path`

    def forward(self, tokens, segment_ids=None, positions=None):
        """Jitted kdjax forward returning every hidden state and attention score (one
        compile per family and shape; tests share it)."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        if not hasattr(self, "_forward"):
            graphdef, state = nnx.split(self.model)
            n = self.model.config.num_layers

            def fwd(state, tokens, segment_ids, positions):
                return nnx.merge(graphdef, state)(
                    tokens, segment_ids=segment_ids, positions=positions,
                    hidden_layers=range(n + 1), attention_layers=range(n))

            self._forward = (jax.jit(fwd), state)
        fn, state = self._forward
        tokens = jnp.asarray(tokens, jnp.int32)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        if positions is None:
            positions = numpy_positions(np.asarray(segment_ids))
        return fn(state, tokens, jnp.asarray(segment_ids, jnp.int32),
                  jnp.asarray(positions, jnp.int32))

    def torch_logits(self, tokens: np.ndarray, **kw):
        import torch

        with torch.no_grad():
            out = self.torch_model(torch.as_tensor(np.array(tokens)), **kw)
        return out


def numpy_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Index of each token within its run of equal segment ids (the reference for
    `positions_from_segments`)."""
    out = np.zeros(segment_ids.shape, np.int32)
    for r, row in enumerate(segment_ids):
        for t in range(1, len(row)):
            out[r, t] = out[r, t - 1] + 1 if row[t] == row[t - 1] else 0
    return out


def build_torch_model(name: str, seed: int = 0):
    """A random float32 transformers model for CASES[name], with every parameter
    (norm weights and biases too) randomized so that each one matters."""
    import torch
    import transformers

    cls_name, kw = CASES[name]
    config = getattr(transformers, cls_name)(**BASE, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """name -> Family for every case in CASES (built lazily, once per session)."""
    from kdjax.models import from_pretrained

    cache = {}

    def get(name: str) -> Family:
        if name not in cache:
            torch_model = build_torch_model(name)
            path = tmp_path_factory.mktemp(name)
            torch_model.save_pretrained(path)
            cache[name] = Family(name, path, torch_model.double(), from_pretrained(path))
        return cache[name]

    return get
