"""kdjax.models: Flax NNX decoders (Llama 2/3, Mistral, Qwen2/2.5, Qwen3), Hugging Face
checkpoint import/export, tokenizers and a KV-cache sampler."""

from .config import DecoderConfig
from .decoder import (
    Decoder,
    DecoderOutput,
    init_decoder,
    positions_from_segments,
    weight_decay_mask,
    with_config,
)
from .hf import from_pretrained, save_pretrained
from .sampler import GenerateOutput, generate, init_cache
from .tokenizer import load_tokenizer, train_bpe_tokenizer

__all__ = [
    "Decoder",
    "DecoderConfig",
    "DecoderOutput",
    "GenerateOutput",
    "from_pretrained",
    "generate",
    "init_cache",
    "init_decoder",
    "load_tokenizer",
    "positions_from_segments",
    "save_pretrained",
    "train_bpe_tokenizer",
    "weight_decay_mask",
    "with_config",
]
