"""`kdjax score` end to end on tiny local models: likelihood and reference log-probs against
float64 torch, the judge's expected grade against a hand computation from torch logits, K
varying per prompt, kill -9 and rerun, 1 vs 8 devices, TRL pairs, and bad input."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from kdjax.generate.dataset import shard_path
from kdjax.schema import ConfigError
from kdjax.score.dataset import PreferenceDataset
from kdjax.score.run import run_score
from kdjax.storage.errors import StoreMismatchError
from tests.score.conftest import DUPLICATE, EMPTY, K_OF_EXAMPLE, config

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
TOL = dict(rtol=2e-5, atol=2e-5)  # f32 forward vs float64 torch


def _bytes(root):
    n = PreferenceDataset(root).manifest["num_shards"]
    return [shard_path(root, i).read_bytes() for i in range(n)]


def _likelihood_config(models, generated, out):
    return config(generated[0], out, model=str(models["teacher"].path),
                  reference=str(models["reference"].path))


@pytest.fixture(scope="module")
def likelihood(models, generated, tmp_path_factory):
    out = tmp_path_factory.mktemp("score") / "likelihood"
    summary = run_score(_likelihood_config(models, generated, out))
    return out, summary, {r["example_id"]: r for r in PreferenceDataset(out).records()}


def test_likelihood_and_reference_equal_float64_torch(models, generated, likelihood):
    _, summary, rows = likelihood
    by_example = {}
    for r in generated[1]:
        if r["completion_ids"]:
            by_example.setdefault(r["example_id"], []).append(r)
    assert sorted(rows) == [e for e, k in K_OF_EXAMPLE.items() if e != 2]  # K=1 skipped
    for eid, row in rows.items():
        cands = by_example[eid]
        assert row["candidate_ids"] == [c["completion_ids"] for c in cands]
        assert row["source_index"] == [c["sample_index"] for c in cands]
        teacher = [models["teacher"].logprobs(c["prompt_ids"], c["completion_ids"])
                   for c in cands]
        ref = [models["reference"].logprobs(c["prompt_ids"], c["completion_ids"])
               for c in cands]
        np.testing.assert_allclose(row["scores"], [t.mean() for t in teacher], **TOL)
        np.testing.assert_allclose(row["ref_logps"], [t.sum() for t in ref], **TOL)
        assert row["ref_counts"] == [len(c["completion_ids"]) for c in cands]
        s = np.asarray(row["scores"], np.float64)
        order = sorted(range(len(s)), key=lambda k: (-s[k], k))
        assert row["rank"] == [order.index(k) for k in range(len(s))]
        if eid == DUPLICATE:
            assert row["chosen"] == row["rejected"] == row["margin"] == []
        else:
            assert (row["chosen"], row["rejected"]) == ([order[0]], [order[-1]])
            assert row["margin"][0] == pytest.approx(s[order[0]] - s[order[-1]], rel=1e-6)
    assert len(rows[EMPTY]["candidates"]) == K_OF_EXAMPLE[EMPTY] - 1
    assert summary["skipped"] == {"empty_prompts": 0, "empty_candidates": 1,
                                  "too_few_candidates": 1}
    assert summary["all_equal"] == 1 and summary["pairs"] == len(rows) - 1
    manifest = PreferenceDataset(likelihood[0]).manifest
    assert manifest["summary"]["all_equal"] == 1 and manifest["plan"]["method"] == "likelihood"


def test_pairs_view_is_the_trl_format(likelihood):
    pairs = list(PreferenceDataset(likelihood[0]).pairs())
    rows = likelihood[2]
    assert len(pairs) == sum(len(r["chosen"]) for r in rows.values())
    for p in pairs:
        r = rows[p["example_id"]]
        c = r["candidate_ids"].index(p["chosen_ids"])
        j = r["candidate_ids"].index(p["rejected_ids"])
        assert p["chosen"] == r["candidates"][c] and r["scores"][c] > r["scores"][j]
        assert p["ref_chosen_logps"] == r["ref_logps"][c]


_DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from kdjax.score.config import ScoreConfig
    from kdjax.score.run import run_score
    config = ScoreConfig.load(None, json.loads(sys.argv[1]))
    def on_shard(shard, done):
        if done >= 1:
            os.kill(os.getpid(), signal.SIGKILL)
    run_score(config, on_shard=on_shard)
""")


def test_store_inputs_build_the_ranking_store(likelihood, tmp_path):
    from kdjax.data.preferences import build_preference_store, open_preference_store

    data = PreferenceDataset(likelihood[0])
    build_preference_store(tmp_path / "store", **data.store_inputs(), prompt_len=16,
                           completion_len=8, vocab_size=400, skip_tied=False)
    store = open_preference_store(tmp_path / "store")
    rows = sorted(likelihood[2].values(), key=lambda r: r["example_id"])
    got = store.read(np.arange(store.num_rows))
    assert got["example_id"].tolist() == [r["example_id"] for r in rows]
    for i, r in enumerate(rows):
        k = len(r["scores"])
        np.testing.assert_array_equal(got["scores"][i, :k], r["scores"])
        np.testing.assert_array_equal(got["ref_logps"][i, :k], r["ref_logps"])


def test_kill9_then_rerun_gives_the_same_bytes(models, generated, likelihood, tmp_path):
    out = tmp_path / "killed"
    cfg = _likelihood_config(models, generated, out)
    overrides = [f"{k}={json.dumps(v)}" for k, v in cfg.to_dict().items()]
    p = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(overrides)], env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    with pytest.raises(Exception, match="incomplete"):
        PreferenceDataset(out)
    assert sorted(x.name for x in (out / "ledger").iterdir()) == ["shard-000000.json"]
    summary = run_score(cfg)
    assert summary["this_run_candidates"] < summary["candidates"]  # only missing shards
    assert _bytes(out) == _bytes(likelihood[0])


def test_one_device_equals_eight(models, generated, likelihood, tmp_path):
    from kdjax.sharding import make_mesh

    mesh = make_mesh(devices=jax.devices()[:1])
    cfg = _likelihood_config(models, generated, tmp_path / "one")
    cfg = dataclasses.replace(cfg, batch_size=3, buckets=[10, 32])  # other batches too
    run_score(cfg, mesh=mesh)
    one = {r["example_id"]: r for r in PreferenceDataset(tmp_path / "one").records()}
    eight = likelihood[2]
    assert sorted(one) == sorted(eight)
    for eid in one:
        np.testing.assert_allclose(one[eid]["scores"], eight[eid]["scores"], rtol=1e-6)
        np.testing.assert_allclose(one[eid]["ref_logps"], eight[eid]["ref_logps"], rtol=1e-6)
        for key in ("rank", "chosen", "rejected"):
            assert one[eid][key] == eight[eid][key]


def test_judge_score_is_the_expected_grade_under_the_teachers_logits(models, generated,
                                                                       tmp_path):
    from kdjax.score.judge import load_template

    teacher = models["teacher"]
    tok = teacher.tokenizer
    run_score(config(generated[0], tmp_path / "judge", model=str(teacher.path), method="judge",
                     pairs="all", judge={"grades": [1, 3, 4, 5, 8]}))
    data = PreferenceDataset(tmp_path / "judge")
    assert data.plan["judge"]["grade_ids"] == tok.convert_tokens_to_ids(["1", "3", "4", "5",
                                                                         "8"])
    grades = np.array([1, 3, 4, 5, 8], np.float64)
    template = load_template(None)
    rows = list(data.records())
    assert len(rows) == 6
    for row in rows[:3]:
        for k, answer in enumerate(row["candidates"]):
            user = template.user.format(prompt=row["question"], answer=answer, min_grade=1,
                                        max_grade=8)
            text = tok.apply_chat_template([{"role": "user", "content": user}],
                                           tokenize=False, add_generation_prompt=True)
            ids = tok(text + "Grade: ", add_special_tokens=False)["input_ids"]
            lsm = teacher.last_logprobs(ids)
            p = np.exp(lsm[tok.convert_tokens_to_ids([str(int(g)) for g in grades])])
            assert row["scores"][k] == pytest.approx(float(grades @ p / p.sum()), rel=2e-5)
            assert row["grade_mass"][k] == pytest.approx(float(p.sum()), rel=2e-5)
        s = np.asarray(row["scores"], np.float64)
        assert all(s[c] - s[j] > 0 for c, j in zip(row["chosen"], row["rejected"]))
        assert len(row["chosen"]) == sum(s[a] != s[b] for a in range(len(s))
                                         for b in range(a + 1, len(s)))


def test_trl_pairs_text_messages_and_implicit_prompt(models, tmp_path):
    from kdjax.data.examples import encode_example

    ref = models["reference"]
    tok = ref.tokenizer
    rows = [{"prompt": "the quick fox", "chosen": " jumps over", "rejected": " lazy dog"},
            {"prompt": [{"role": "user", "content": "data store"}],
             "chosen": [{"role": "assistant", "content": "shard chunk"}],
             "rejected": [{"role": "assistant", "content": "row"}]},
            {"chosen": [{"role": "user", "content": "mesh"},
                        {"role": "assistant", "content": "device host"}],
             "rejected": [{"role": "user", "content": "mesh"},
                          {"role": "assistant", "content": "epoch"}]}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))
    path2 = tmp_path / "chat.jsonl"
    path2.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    for source, expect in ((path, rows[:1]), (path2, rows[1:])):
        out = tmp_path / f"out_{source.stem}"
        summary = run_score(config(source, out, method="labels", reference=str(ref.path)))
        assert summary["format"] == "pairs" and summary["pairs"] == len(expect)
        got = list(PreferenceDataset(out).records())
        for row, r in zip(got, expect):
            if isinstance(r["chosen"], str):
                p_ids = tok(r["prompt"], add_special_tokens=True)["input_ids"]
                c_ids = [tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                         for x in (r["chosen"], r["rejected"])]
            else:
                prompt = r.get("prompt", r["chosen"][:-1])
                encoded = [encode_example(tok, [*prompt, x[-1]])
                           for x in (r["chosen"], r["rejected"])]
                p_ids = encoded[0][0].tolist()
                c_ids = [e[1].tolist() for e in encoded]
            assert row["prompt_ids"] == p_ids and row["candidate_ids"] == c_ids
            assert row["scores"] == [1.0, 0.0] and (row["chosen"], row["rejected"]) == ([0], [1])
            np.testing.assert_allclose(row["ref_logps"],
                                       [ref.logprobs(p_ids, c).sum() for c in c_ids], **TOL)


def test_bad_inputs_get_clear_errors(models, generated, likelihood, tmp_path):
    teacher, other = models["teacher"], models["other"]
    with pytest.raises(ConfigError, match=r"^reference: the reference model '/nope' does not "
                       "exist"):
        run_score(config(generated[0], tmp_path / "a", model=str(teacher.path),
                         reference="/nope"))
    with pytest.raises(StoreMismatchError, match="another tokenizer .* than the teacher's"):
        run_score(config(generated[0], tmp_path / "b", model=str(other.path)))
    with pytest.raises(ValueError, match="method=labels keeps the data's own scores"):
        run_score(config(generated[0], tmp_path / "c", method="labels",
                         reference=str(models["reference"].path)))
    data = PreferenceDataset(likelihood[0])
    data.check_tokenizer(teacher.tokenizer)
    with pytest.raises(StoreMismatchError, match="holds token ids of another tokenizer"):
        data.check_tokenizer(other.tokenizer)
    # a finished dataset and other settings: refused, not mixed
    with pytest.raises(StoreMismatchError, match="other settings .*min_margin"):
        run_score(config(generated[0], likelihood[0], model=str(teacher.path),
                         reference=str(models["reference"].path), min_margin=0.5))


def test_a_preference_dataset_is_read_back_and_its_tokenizer_checked(models, likelihood,
                                                                     tmp_path):
    out = tmp_path / "again"
    summary = run_score(config(likelihood[0], out, method="labels",
                               reference=str(models["reference"].path)))
    assert summary["format"] == "scored"
    again = {r["example_id"]: r for r in PreferenceDataset(out).records()}
    for eid, row in likelihood[2].items():
        for key in ("scores", "rank", "chosen", "rejected", "candidate_ids", "ref_logps"):
            assert again[eid][key] == row[key], key
    with pytest.raises(StoreMismatchError, match="another tokenizer .* than the reference's"):
        run_score(config(likelihood[0], tmp_path / "x", method="labels",
                         reference=str(models["other"].path)))


def test_a_dataset_without_reference_says_so(models, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fox", "chosen": " dog", "rejected": " row"}) + "\n")
    out = tmp_path / "noref"
    run_score(config(path, out, method="labels", tokenizer=str(models["teacher"].path)))
    data = PreferenceDataset(out)
    assert not data.has_reference and next(data.records())["ref_logps"] is None
    with pytest.raises(StoreMismatchError, match="has no reference log-probs"):
        data.require_reference()


def test_cli_runs_and_prints_the_summary(models, tmp_path, capsys):
    from kdjax.cli import main

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fox", "chosen": " dog", "rejected": " dog"}) + "\n")
    out = tmp_path / "cli"
    assert main(["score", "--data", str(path), "--out", str(out), "--method", "labels",
                 f"tokenizer={models['teacher'].path}"]) == 0
    text = capsys.readouterr().out
    assert f"preference dataset {out}: 1 prompts" in text and "1 pairs" in text
    assert main(["score", "--data", str(path), "--out", str(out), "pairs=some"]) == 2
    assert "pairs: unknown value 'some'" in capsys.readouterr().err


@pytest.mark.parametrize("mesh", [[8, 1, 1], [4, 2, 1]])
def test_scoring_gathers_parameters_only(models, mesh):
    """Rows stay split over data × fsdp: the compiled forwards move only parameter-sized
    arrays (FSDP weight gathers), never activations, and no all-reduce of results."""
    from flax import nnx

    from kdjax.score.reference import load_model
    from kdjax.score.scorer import Scorer
    from tests.models.hlo import collectives

    cfg = config("x", "y", model=str(models["teacher"].path), mesh=mesh)
    gen = load_model(cfg.model, cfg)
    shapes = set()
    for leaf in jax.tree.leaves(nnx.state(gen.model)):
        for s in (leaf.shape, leaf.shape[1:]):  # whole, or one layer of the scanned stack
            shapes |= {tuple(s)} | ({(s[0], math.prod(s[1:])), (math.prod(s[:-1]), s[-1])}
                                    if len(s) > 1 else set())  # heads merged
    scorer = Scorer(gen.model, gen.mesh, 8, [16])
    for kind in ("logprobs", "grades"):
        moved = collectives(scorer.lower(kind, 16).compile().as_text())
        assert all(op == "all-gather" and shape in shapes for op, _, shape in moved), moved
        assert bool(moved) == (mesh[1] > 1)
