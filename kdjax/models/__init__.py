"""kdjax.models: Flax NNX decoders (Llama 2/3, Mistral, Qwen2/2.5, Qwen3), Hugging Face
checkpoint import/export, tokenizers and a KV-cache sampler.

Names are imported on first use (PEP 562), so `from kdjax.models.config import
DecoderConfig` (config parsing) imports no JAX.
"""

from kdjax._lazy import lazy_exports

# public name → the submodule that defines it
_EXPORTS = {
    "DecoderConfig": "config",
    "Decoder": "decoder",
    "DecoderOutput": "decoder",
    "init_decoder": "decoder",
    "positions_from_segments": "decoder",
    "weight_decay_mask": "decoder",
    "with_config": "decoder",
    "from_pretrained": "hf",
    "init_from_teacher": "student_init",
    "convert_gguf": "gguf",
    "save_pretrained": "hf",
    "FINISH_REASONS": "sampler",
    "GenerateOutput": "sampler",
    "example_keys": "sampler",
    "generate": "sampler",
    "init_cache": "sampler",
    "trace_count": "sampler",
    "filter_logits": "sampling",
    "trim_ids_at_stop_strings": "sampling",
    "truncate_at_stop_strings": "sampling",
    "load_tokenizer": "tokenizer",
    "train_bpe_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
