"""Tiny local models and candidate datasets for the `kdjax score` tests.

Two random transformers Llamas share a byte-level BPE tokenizer with a chat template (the
teacher and a reference; their torch copies are kept in float64 as the oracle); "other" is
the teacher's weights with another tokenizer. The generated dataset is written directly (no
sampling): prompts with K = 4, 2, 3 candidates, one with a single candidate, one whose two
candidates are equal, one with an empty candidate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil

import numpy as np
import pytest

from tests.data.conftest import WORDS, make_tokenizer

K_OF_EXAMPLE = {0: 4, 1: 2, 2: 1, 3: 3, 4: 2, 5: 3, 6: 2}  # example_id → candidates
DUPLICATE = 4  # its two candidates are identical: all scores equal, no pair
EMPTY = 5  # its candidate 1 has no tokens (dropped, counted)


@contextlib.contextmanager
def one_torch_thread():
    """Torch on one thread: its thread pool thrashes on a loaded 2-core machine (100×
    slower for these tiny forwards); the setting is restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclasses.dataclass
class Model:
    path: object
    torch_model: object  # float64
    tokenizer: object

    def logprobs(self, prompt_ids, completion_ids) -> np.ndarray:
        """float64 log p(c_t | prompt, c_<t) of every completion token, from torch."""
        import torch

        ids = list(prompt_ids) + list(completion_ids)
        with torch.no_grad(), one_torch_thread():
            logits = self.torch_model(torch.tensor([ids])).logits[0].double()
        lsm = torch.log_softmax(logits, -1).numpy()
        p = len(prompt_ids)
        return np.array([lsm[p - 1 + t, c] for t, c in enumerate(completion_ids)])

    def last_logprobs(self, ids) -> np.ndarray:
        """float64 log-softmax of the next-token logits after `ids`."""
        import torch

        with torch.no_grad(), one_torch_thread():
            logits = self.torch_model(torch.tensor([list(ids)])).logits[0, -1].double()
        return torch.log_softmax(logits, -1).numpy()


def make_model(path, tokenizer, seed: int) -> Model:
    """A random transformers Llama saved to `path` with `tokenizer` (its float64 copy kept)."""
    with one_torch_thread():
        return _make_model(path, tokenizer, seed)


def _make_model(path, tokenizer, seed: int) -> Model:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # logits of std ~2 (not ~0.1): log-probs that differ clearly
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Model(path, model.double().eval(), tokenizer)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """{"teacher", "reference", "other"} tiny models; "other" has another tokenizer."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("score_models")
    make_tokenizer(root / "tok")
    make_tokenizer(root / "tok_other", vocab_size=300)
    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    other_tok = AutoTokenizer.from_pretrained(str(root / "tok_other"))
    teacher = make_model(root / "teacher", tok, 0)
    other = root / "other"  # the teacher's weights with another tokenizer
    shutil.copytree(teacher.path, other)
    for f in other.glob("*token*"):
        f.unlink()
    other_tok.save_pretrained(other)
    return {"teacher": teacher, "reference": make_model(root / "reference", tok, 1),
            "other": Model(other, None, other_tok)}


def write_generated(path, tokenizer, *, seed: int = 0, shard_examples: int = 3):
    """A generated dataset of the examples in `K_OF_EXAMPLE` (random prompts and
    completions of 2–7 tokens, EOS-terminated); returns its records."""
    from kdjax.data.tokenize import tokenizer_fingerprint
    from kdjax.generate.dataset import GeneratedWriter

    rng = np.random.default_rng(seed)
    records = []
    for eid, k in K_OF_EXAMPLE.items():
        prompt = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        for s in range(k):
            if eid == DUPLICATE and s == 1:
                ids = list(records[-1]["completion_ids"])
            elif eid == EMPTY and s == 1:
                ids = []
            else:
                n = int(rng.integers(1, 7))
                ids = [int(i) for i in rng.integers(4, len(tokenizer), n)]
                ids.append(tokenizer.eos_token_id)
            records.append({"example_id": eid, "sample_index": s, "prompt": prompt,
                            "completion": tokenizer.decode(ids, skip_special_tokens=True),
                            "prompt_ids": p_ids, "completion_ids": ids,
                            "finish_reason": "eos", "logprobs": [-1.0] * len(ids),
                            "mean_logprob": -1.0})
    eids = list(K_OF_EXAMPLE)
    shards = [eids[i:i + shard_examples] for i in range(0, len(eids), shard_examples)]
    w = GeneratedWriter(path, {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                               "seed": seed}, len(shards))
    for i, part in enumerate(shards):
        w.write_shard(i, [r for r in records if r["example_id"] in part])
    w.finish({"records": len(records)})
    return records


@pytest.fixture(scope="session")
def generated(models, tmp_path_factory):
    path = tmp_path_factory.mktemp("score_data") / "generated"
    return path, write_generated(path, models["teacher"].tokenizer)


def config(data, out, **over):
    """A `ScoreConfig` for the tests (float32, tiny batches, two prompts per shard)."""
    from kdjax.score.config import ScoreConfig

    values = dict(data=str(data), out=str(out), dtype="float32", batch_size=8,
                  shard_prompts=2, progress=False)
    values.update(over)
    return ScoreConfig.load(None, [f"{k}={json.dumps(v)}" for k, v in values.items()
                                   if v is not None])
