"""Sampling for `kdjax generate`: the loaded generator, per-sequence keys, prompt-length
buckets, stop handling, and records of n completions per prompt."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kdjax.generate.config import GenerateConfig


@dataclasses.dataclass
class Generator:
    """A loaded model, its tokenizer and what identifies them."""

    model: object
    tokenizer: object
    model_fingerprint: str
    tokenizer_fingerprint: str
    mesh: object = None


def load_generator(config: GenerateConfig) -> Generator:
    """The model (sharded over `config.mesh`) and tokenizer of `config.model`."""
    from kdjax import models
    from kdjax.data.tokenize import tokenizer_fingerprint
    from kdjax.sharding import make_mesh
    from kdjax.storage import fingerprint_dir, fingerprint_file

    mesh = make_mesh(*config.mesh)
    path = Path(os.path.expanduser(config.model))
    dtypes = dict(dtype=config.dtype, param_dtype=config.param_dtype or config.dtype)
    if path.suffix.lower() == ".gguf" and path.is_file():
        from kdjax.models import gguf

        model = models.from_pretrained(path, mesh=mesh, **dtypes)
        tokenizer = gguf.load_tokenizer(path)
        fingerprint = fingerprint_file(path)
    elif (path / "config.json").is_file():
        model = models.from_pretrained(path, mesh=mesh, **dtypes)
        tokenizer = models.load_tokenizer(config.tokenizer or path)
        fingerprint = fingerprint_dir(path, patterns=("config.json", "*.safetensors"))
    else:  # a kdjax run directory: its latest checkpoint
        from kdjax.train.checkpoint import restore_student
        from kdjax.train.eval_cli import run_config

        run = run_config(str(path), [f"model.dtype={config.dtype}"])
        student, step = restore_student(run)
        model = student
        tok = config.tokenizer or run.data.tokenizer
        if tok is None:
            raise ValueError(f"run {path} has no data.tokenizer; pass tokenizer=DIR")
        tokenizer = models.load_tokenizer(tok)
        fingerprint = f"{fingerprint_dir(path / 'checkpoints', patterns=('*',))}@{step}"
    return Generator(model, tokenizer, fingerprint, tokenizer_fingerprint(tokenizer), mesh)


def buckets_for(config: GenerateConfig, width: int) -> list[int]:
    """Prompt-length buckets: the configured ones capped at `width`, else powers of two."""
    if config.buckets is not None:
        out = sorted({min(b, width) for b in config.buckets} | {width})
    else:
        out = sorted({min(1 << k, width) for k in range(3, max(4, width.bit_length() + 1))}
                     | {width})
    return out


def stop_ids(config: GenerateConfig, gen: Generator) -> tuple[list[int], list[int]]:
    """(EOS ids, other stop ids): both end a completion and stay in it."""
    eos = gen.model.config.eos_token_id
    eos = [] if eos is None else list(np.atleast_1d(eos).tolist())
    if gen.tokenizer.eos_token_id is not None and gen.tokenizer.eos_token_id not in eos:
        eos.append(int(gen.tokenizer.eos_token_id))
    return eos, [t for t in config.stop_token_ids if t not in eos]


def sequence_keys(seed: int, example_ids: Sequence[int], sample_index: Sequence[int]):
    """One PRNG key per sequence: fold_in(fold_in(key(seed), example_id), sample_index)."""
    import jax

    base = jax.random.key(seed)
    ex = np.asarray(example_ids, np.uint32)
    si = np.asarray(sample_index, np.uint32)
    return jax.vmap(lambda e, s: jax.random.fold_in(jax.random.fold_in(base, e), s))(ex, si)


FINISH_CODES = {0: "length", 1: "eos", 2: "stop"}  # `GenerateOutput.finish_reason`


def generate_records(gen: Generator, config: GenerateConfig, prompts: np.ndarray,
                     prompt_lens: np.ndarray, example_ids: np.ndarray,
                     prompt_texts: Sequence[str] | None = None,
                     on_batch: Callable[[int, int], None] | None = None,
                     temperature: float | None = None,
                     max_new_tokens: int | None = None) -> list[dict]:
    """Records of `config.n` completions of each prompt, in (example, sample) order.

    Args:
      prompts: `[E, P]` int left-aligned prompts; prompt_lens `[E]`; example_ids `[E]`.
      prompt_texts: the prompts as text (decoded from the ids when None).
      on_batch: called with (sequences, generated tokens) after each batch.
    """
    from kdjax.models.sampler import generate
    from kdjax.models.sampling import trim_ids_at_stop_strings, truncate_at_stop_strings

    n = config.n
    temperature = config.temperature if temperature is None else temperature
    max_new = config.max_new_tokens if max_new_tokens is None else max_new_tokens
    eos, other = stop_ids(config, gen)
    pad = gen.tokenizer.pad_token_id if gen.tokenizer.pad_token_id is not None else 0
    width = prompts.shape[1]
    buckets = buckets_for(config, width)
    seq_ex = np.repeat(np.arange(len(prompts)), n)  # sequence → row of `prompts`
    seq_si = np.tile(np.arange(n), len(prompts))
    seq_bucket = np.searchsorted(buckets, prompt_lens[seq_ex])
    out: dict[int, dict] = {}
    decode = lambda ids: gen.tokenizer.decode(ids, skip_special_tokens=True)
    for b in range(len(buckets)):
        rows = np.flatnonzero(seq_bucket == b)
        for start in range(0, len(rows), config.batch_size):
            chunk = rows[start:start + config.batch_size]
            real = len(chunk)
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], config.batch_size - real)])
            ex = seq_ex[chunk]
            res = generate(
                gen.model, prompts[ex, :buckets[b]], prompt_lengths=prompt_lens[ex],
                max_new_tokens=max_new, temperature=temperature, top_k=config.top_k,
                top_p=config.top_p, eos_token_id=eos, stop_token_ids=other,
                pad_token_id=pad,
                seeds=sequence_keys(config.seed, example_ids[ex], seq_si[chunk]),
                mesh=gen.mesh)
            tokens, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
            logprobs, finish = np.asarray(res.logprobs), np.asarray(res.finish_reason)
            for j in range(real):
                s = int(chunk[j])
                ids = tokens[j, :lengths[j]].tolist()
                lp = logprobs[j, :lengths[j]].astype(np.float32)
                reason = FINISH_CODES[int(finish[j])]
                trimmed, hit = trim_ids_at_stop_strings(ids, config.stop, decode)
                if hit:
                    ids, lp, reason = trimmed, lp[:len(trimmed)], "stop"
                text, _ = truncate_at_stop_strings(decode(ids), config.stop)
                e = int(seq_ex[s])
                p_ids = prompts[e, :prompt_lens[e]].tolist()
                out[s] = {"example_id": int(example_ids[e]), "sample_index": int(seq_si[s]),
                          "prompt": prompt_texts[e] if prompt_texts is not None
                          else gen.tokenizer.decode(p_ids, skip_special_tokens=False),
                          "completion": text, "prompt_ids": p_ids, "completion_ids": ids,
                          "finish_reason": reason, "logprobs": lp.tolist(),
                          "mean_logprob": float(lp.mean()) if len(lp) else 0.0}
            if on_batch is not None:
                on_batch(real, int(lengths[:real].sum()))
    return [out[s] for s in range(len(seq_ex))]
