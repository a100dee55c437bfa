"""Tokenizers: load any local transformers tokenizer, or train a small byte-level BPE
(for the embedded default and tests) that `AutoTokenizer` loads back."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>")
# A minimal chat template: role markers, each turn ended by EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
    "{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def load_tokenizer(path: str | os.PathLike):
    """`transformers.AutoTokenizer.from_pretrained(path)` for a local directory, with a
    clear error when the directory holds no tokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                            "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"{path} holds no tokenizer files (tokenizer.json / "
                                "tokenizer_config.json); train one with "
                                "kdjax.models.train_bpe_tokenizer or copy a model's tokenizer")
    return AutoTokenizer.from_pretrained(path)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *,
                        min_frequency: int = 1, chat_template: bool = True):
    """Trains a byte-level BPE (GPT-2 style: every byte is a base token, so any text
    encodes) on `texts` and saves it to `out_dir` as a transformers fast tokenizer.

    Special tokens (ids 0..4): `<|pad|>`, `<|bos|>`, `<|eos|>`, `<|user|>`,
    `<|assistant|>`; a chat template is included unless `chat_template=False`.

    Args:
      texts: training text (any iterable of str).
      vocab_size: target vocabulary size, ≥ 256 bytes + 5 specials.
      out_dir: directory to write (created).
    Returns the loaded `PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE: need at "
                         f"least {minimum} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>",
                                   bos_token="<|bos|>", eos_token="<|eos|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast
