"""SeqKD end to end on a tiny transformers Llama: `kdjax generate` → `kdjax pack` of the
generated dataset → train with hard labels (configs/seqkd/seqkd_hard.yaml) and with hard
labels plus a sampled teacher store precomputed on the same rows
(configs/seqkd/seqkd_sampled.yaml).

Checked against independent references: the packed rows against the generated records
(prompt masked out, every completion token a target, EOS included), and the first step's
logged CE and KL against float64 torch forwards of the same rows and the store's counts.
The example configs of configs/seqkd/ and configs/smollm2/ parse.
"""

import json

import numpy as np
import pytest

from tests.data.conftest import make_tokenizer, random_texts, write_jsonl

PROMPTS = 12
N = 2            # completions per prompt
NEW_TOKENS = 8
SEQ_LEN = 48     # every generated document fits a row whole ("pad" packing)
ALPHA = 0.5      # seqkd_sampled.yaml's mix of CE and KL


@pytest.fixture(scope="module")
def seqkd(tmp_path_factory):
    """A tiny Llama (transformers, float32 on disk) whose EOS is likely, its generated
    dataset, the packed SeqKD rows, and a sampled store on those rows."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kdjax.data import build_example_store, build_token_store
    from kdjax.generate.config import GenerateConfig
    from kdjax.generate.run import run_generate
    from kdjax.teacher import precompute
    from kdjax.teacher.config import PrecomputeConfig

    root = tmp_path_factory.mktemp("seqkd")
    make_tokenizer(root / "model")
    tok = AutoTokenizer.from_pretrained(str(root / "model"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # EOS row along the mean final hidden state: EOS comes early
        ids = torch.randint(4, len(tok), (32, 16))
        h = model(ids, output_hidden_states=True).hidden_states[-1].reshape(-1, 32)
        model.lm_head.weight[tok.eos_token_id] = 4.0 * h.mean(0) / h.mean(0).norm()
    model.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    write_jsonl(root / "prompts.jsonl",
                [{"prompt": t} for t in random_texts(rng, PROMPTS, max_words=6)])
    build_example_store(str(root / "prompts.jsonl"), str(root / "model"), root / "prompts",
                        prompt_len=24, prompt_field="prompt", progress=False)
    over = dict(model=str(root / "model"), prompts=str(root / "prompts" / "train"),
                out=str(root / "gen"), n=N, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=1,
                batch_size=8, buckets=[24], dtype="float32", progress=False,  # one compile
                filter={"finished_only": False, "near_duplicate": None, "dedup": False})
    run_generate(GenerateConfig.load(None, [f"{k}={json.dumps(v)}" for k, v in over.items()]))
    build_token_store(str(root / "gen" / "curated"), tok, root / "tokens", seq_len=SEQ_LEN,
                      pack_mode="pad", progress=False, shard_rows=8)
    precompute(PrecomputeConfig.load(None, [
        f"teacher={root / 'model'}", f"tokens={root / 'tokens' / 'train'}",
        f"out={root / 'store'}", "mode=sampled", "num_samples=16", "dtype=float32",
        "progress=false"]))
    torch_model = LlamaForCausalLM.from_pretrained(root / "model").double().eval()
    return root, tok, torch_model


def _records(root):
    from kdjax.generate.dataset import GeneratedDataset

    return list(GeneratedDataset(root / "gen" / "curated").records())


def _segments(rows):
    """(row, start, end) of every segment of the stored rows, in order."""
    out = []
    for r, seg in enumerate(rows["segment_ids"]):
        for s in range(1, int(seg.max()) + 1):
            where = np.flatnonzero(seg == s)
            out.append((r, int(where[0]), int(where[-1]) + 1))
    return out


def test_packed_rows_train_on_the_completions_only(seqkd):
    from kdjax.data import open_token_store

    root, tok, _ = seqkd
    records = _records(root)
    assert len(records) == PROMPTS * N
    eos_records = [r for r in records if r["finish_reason"] == "eos"]
    assert eos_records and len(eos_records) < len(records)  # both kinds are covered
    assert all(r["completion_ids"][-1] == tok.eos_token_id for r in eos_records)
    store = open_token_store(root / "tokens" / "train")
    rows = store.read(list(range(store.num_rows)))
    segments = _segments(rows)
    docs = [r for r in records if r["completion_ids"]]
    assert len(segments) == len(docs)  # "pad" packing: one whole document per segment
    for (r, a, b), rec in zip(segments, docs):
        p, c = rec["prompt_ids"], rec["completion_ids"]
        assert rows["tokens"][r, a:b].tolist() == p + c
        # loss_mask[t]: token t+1 is a target; the last prompt token predicts the first
        # completion token, and the last completion token (EOS when it ended) is a target
        want = [False] * (len(p) - 1) + [True] * len(c) + [False]
        assert rows["loss_mask"][r, a:b].tolist() == want
        assert rows["targets"][r, a:b - 1].tolist() == (p + c)[1:]
    covered = np.zeros(rows["loss_mask"].shape, bool)
    for r, a, b in segments:
        covered[r, a:b] = True
    assert not rows["loss_mask"][~covered].any()  # padding never trains


def _train(root, config_file, run_dir, *over):
    from kdjax.train.config import load_config
    from kdjax.train.loop import train

    config = load_config(config_file, [
        f"run_dir={run_dir}", "steps=2", "global_batch_size=8", "seed=0",
        f"model.path={root / 'model'}", "model.dtype=float32",
        f"data.train={root / 'tokens' / 'train'}", "data.eval=null",
        f"data.tokenizer={root / 'model'}", "optimizer.lr=1e-2", "optimizer.warmup_steps=0",
        "checkpoint.every=0", "checkpoint.async_save=false", "logging.every=1",
        "logging.progress=false", "logging.tensorboard=false", "logging.plot=false", *over])
    train(config)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _reference(root, torch_model, *, with_store: bool) -> dict:
    """Float64 CE (and sampled-store KL) over the loss tokens of the first batch."""
    import torch

    from kdjax.data import Loader, open_token_store
    from kdjax.sharding import make_mesh
    from kdjax.teacher import open_teacher_store

    tokens = open_token_store(root / "tokens" / "train")
    rows_idx = Loader(tokens, global_batch_size=8, seed=0, mesh=make_mesh()).rows_at(0)
    rows = tokens.read(rows_idx)
    store = open_teacher_store(root / "store").read(rows_idx) if with_store else None
    n_draws = 16
    ce = kl = count = 0.0
    for r, a, b in _segments(rows):
        ids = torch.as_tensor(rows["tokens"][r:r + 1, a:b].astype(np.int64))
        with torch.no_grad():
            logp = torch.log_softmax(torch_model(ids).logits[0], -1).numpy()
        for t in np.flatnonzero(rows["loss_mask"][r, a:b]):
            ce -= logp[t, rows["targets"][r, a + t]]
            count += 1
            if store is not None:
                c = store["counts"][r, a + t].astype(np.float64)
                i = store["ids"][r, a + t].astype(np.int64)
                p = c[c > 0] / n_draws
                kl += np.sum(p * (np.log(p) - logp[t, i[c > 0]]))
    return {"ce": ce / count, "kd": kl / count}


def test_seqkd_hard_first_step_is_the_answer_tokens_cross_entropy(seqkd, tmp_path):
    root, _, torch_model = seqkd
    metrics = _train(root, "configs/seqkd/seqkd_hard.yaml", tmp_path / "hard")
    assert [m["step"] for m in metrics if m["split"] == "train"] == [1, 2]
    assert all(np.isfinite(m["loss"]) for m in metrics if m["split"] == "train")
    want = _reference(root, torch_model, with_store=False)
    first = metrics[0]
    np.testing.assert_allclose(first["ce"], want["ce"], rtol=2e-5)
    np.testing.assert_allclose(first["loss"], want["ce"], rtol=2e-5)  # alpha = 1


def test_seqkd_sampled_first_step_mixes_ce_and_the_stores_kl(seqkd, tmp_path):
    root, _, torch_model = seqkd
    metrics = _train(root, "configs/seqkd/seqkd_sampled.yaml", tmp_path / "sampled",
                     f"store.path={root / 'store'}", "store.eval_path=null",
                     f"objective.alpha={ALPHA}")
    assert all(np.isfinite(m["loss"]) for m in metrics if m["split"] == "train")
    want = _reference(root, torch_model, with_store=True)
    first = metrics[0]
    assert want["kd"] > 0.05  # 16 draws differ from the model itself: a real signal
    np.testing.assert_allclose(first["ce"], want["ce"], rtol=2e-5)
    np.testing.assert_allclose(first["kd"], want["kd"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(first["loss"], ALPHA * want["ce"] + (1 - ALPHA) * want["kd"],
                               rtol=2e-5)


def test_a_store_of_other_rows_is_refused(seqkd, tmp_path):
    from kdjax.data import build_token_store
    from kdjax.storage import StoreMismatchError

    root, tok, _ = seqkd
    # the same samples packed another way: same tokenizer and length, other rows
    build_token_store(str(root / "gen" / "curated"), tok, tmp_path / "tokens",
                      seq_len=SEQ_LEN, pack_mode="split", progress=False)
    with pytest.raises(StoreMismatchError, match="computed on other data"):
        _train(root, "configs/seqkd/seqkd_sampled.yaml", tmp_path / "bad",
               f"data.train={tmp_path / 'tokens' / 'train'}", f"store.path={root / 'store'}",
               "store.eval_path=null")


@pytest.mark.parametrize("path", ["configs/seqkd/seqkd_hard.yaml",
                                  "configs/seqkd/seqkd_sampled.yaml",
                                  "configs/smollm2/train_a_seqkd.yaml",
                                  "configs/smollm2/train_b_seqkd_sampled.yaml",
                                  "configs/smollm2/train_c_sampled.yaml"])
def test_example_train_configs_parse(path):
    from kdjax.train.config import load_config

    config = load_config(path)
    assert config.objective.alpha == (1.0 if "hard" in path or "a_seqkd" in path else
                                      0.0 if "c_sampled" in path else 0.5)
    assert (config.store.path is None) == (config.objective.alpha == 1.0)


def test_example_generate_and_precompute_configs_parse():
    from kdjax.generate.config import GenerateConfig
    from kdjax.generate.expand import read_seeds
    from kdjax.teacher.config import PrecomputeConfig

    gen = GenerateConfig.load("configs/smollm2/generate.yaml")
    assert gen.mode == "expand" and len(read_seeds(gen.expand.seed_file)) >= 30
    for path in ("configs/smollm2/precompute.yaml", "configs/seqkd/precompute_sampled.yaml"):
        pre = PrecomputeConfig.load(path)
        assert pre.mode == "sampled" and pre.num_slots == pre.num_samples  # U = N: unbiased
