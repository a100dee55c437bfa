"""The ranking objective on tiny Llamas: DPO value and gradient equal TRL's DPOTrainer
loss (same weights both sides); IPO, SimPO, RRHF, PRO, listwise KL and DistiLLM-2 equal
float64 torch implementations of the papers' formulas on whole sequences (with ties,
padding slots and skipped prompts), values and gradients; the stored reference equals
the online one and is computed once; training raises reward accuracy and margin; bad
input errors."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax.data.preferences import (
    build_preference_store,
    open_preference_store,
    with_reference_logps,
)
from kdjax.models import Decoder, DecoderConfig, from_pretrained
from kdjax.models.hf import _layout
from kdjax.schema import ConfigError
from kdjax.sharding import make_mesh
from kdjax.train.ranking import (
    RankingObjective,
    best_worst,
    precompute_reference_logps,
    ranking_terms,
    reference_logps,
    usable,
)
from kdjax.train.state import split_model
from tests.tolerances import assert_close

torch = pytest.importorskip("torch")

V, P, C, B, K = 64, 5, 6, 4, 4
LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """Policy and reference: random transformers Llamas (float64 copies kept as the
    oracle) loaded into kdjax from their save_pretrained directories."""
    from transformers import LlamaConfig, LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the oracle is tiny; more threads only fight XLA's for cores
    out = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        decoder = from_pretrained(path)
        out[name], out["config"] = split_model(decoder), decoder.config
        out[f"{name}_torch"] = model.double().eval()
    yield SimpleNamespace(**out)
    torch.set_num_threads(threads)


def _rows(rng, k=K):
    """Preference rows with every edge: distinct scores; a padding slot and a tie below
    the best; one valid candidate (skipped); all valid candidates tied (skipped)."""
    scores = rng.normal(size=(B, k)).astype(np.float32)
    valid = np.ones((B, k), bool)
    valid[1, -1] = False
    scores[1, 2] = scores[1, 1]
    valid[2, 1:] = False
    valid[3, -1] = False
    scores[3] = 0.5
    return dict(prompt=rng.integers(3, V, (B, P)).astype(np.int32),
                prompt_len=np.array([P, 2, 3, 1], np.int32),
                candidates=rng.integers(3, V, (B, k, C)).astype(np.int32),
                candidate_len=rng.integers(1, C + 1, (B, k)).astype(np.int32),
                scores=scores, valid=valid)


def _jax(rows):
    return {key: jnp.asarray(v) for key, v in rows.items()}


def _torch_logps(model, rows):
    """`[B, K]` float64 Σ log p(candidate | prompt), one unpadded sequence at a time
    (0 for padding slots); differentiable in model."""
    out = torch.zeros(rows["scores"].shape, dtype=torch.float64)
    for b, k in zip(*np.nonzero(rows["valid"])):
        p, c = rows["prompt_len"][b], rows["candidate_len"][b, k]
        seq = np.concatenate([rows["prompt"][b, :p], rows["candidates"][b, k, :c]])
        logits = model(torch.as_tensor(seq[None], dtype=torch.long)).logits[0]
        lp = torch.log_softmax(logits[p - 1:p + c - 1], -1)
        out[b, k] = lp.gather(1, torch.as_tensor(seq[p:, None], dtype=torch.long)).sum()
    return out


def _grads_as_kdjax(model, params, cfg):
    """The torch model's .grad of every tensor, laid out like kdjax's params."""
    named = dict(model.named_parameters())

    def one(path, leaf):
        keys = tuple(k.key for k in path)
        layers = [named[name].grad.numpy().reshape(view).transpose(perm)
                  for name, _, view, perm in _layout(keys, cfg)]
        return np.stack(layers) if keys[0] == "layers" else layers[0]

    return jax.tree_util.tree_map_with_path(one, params)


def _assert_grads(g_kdjax, g_ref):
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g_ref))
    for a, b in zip(jax.tree.leaves(g_kdjax), jax.tree.leaves(g_ref)):
        assert_close(a, b, rtol=2e-4, atol=2e-5 * scale)


_COMPILED = {}


def _value_and_grad(obj, split, teacher=None, mesh=None):
    """Jitted mean loss, metrics and gradient (one compile per objective, shared)."""
    key = (obj, id(split), mesh)
    if key not in _COMPILED:
        def f(params, batch, t_params):
            t = None if teacher is None else (teacher[0], t_params, teacher[2])
            loss, metrics = obj({"model": params}, batch, graphdef=split[0],
                                step=jnp.int32(0), teacher=t, rest=split[2], mesh=mesh)
            return loss.mean(), metrics

        _COMPILED[key] = jax.jit(jax.value_and_grad(f, has_aux=True))
    fn = _COMPILED[key]
    return lambda batch: fn(split[1], batch, None if teacher is None else teacher[1])


# ------------------------------------------------------------------ DPO vs TRL


def _trl_dpo(llamas, rows, beta, tmp_path):
    """TRL's DPOTrainer.compute_loss (and its backward) on the best/worst pair of every
    usable row, with the float64 torch policy and precomputed float64 reference log-probs
    in the batch (TRL's `precompute_ref_log_probs` path, as kdjax's stored reference)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    from tests.data.conftest import make_tokenizer

    tok = AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "tok")))
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none",
                         beta=beta, bf16=False, save_strategy="no", disable_tqdm=True)
    # the trainer needs a dataset to start; the batch below is built from our rows.
    # bf16=False: TRL's default (True) runs the forwards under bf16 autocast on CPU
    ds = Dataset.from_dict({"prompt": ["the fox"], "chosen": [" jumps"], "rejected": [" dog"]})
    trainer = trl.DPOTrainer(model=llamas.policy_torch, ref_model=llamas.reference_torch,
                             args=args, train_dataset=ds, processing_class=tok)
    trainer.precompute_ref_logps = True  # read ref_*_logps from the batch
    ref = _torch_logps(llamas.reference_torch, rows).detach()
    examples, pairs = [], []
    for b in (0, 1):  # the usable rows; best = first max, worst = first min
        s = np.where(rows["valid"][b], rows["scores"][b], np.nan)
        c, r = int(np.nanargmax(s)), int(np.nanargmin(s))
        ids = [rows["candidates"][b, k, :rows["candidate_len"][b, k]].tolist() for k in (c, r)]
        examples.append({"prompt_ids": rows["prompt"][b, :rows["prompt_len"][b]].tolist(),
                         "chosen_ids": ids[0], "rejected_ids": ids[1]})
        pairs.append((ref[b, c], ref[b, r]))
    batch = trainer.data_collator(examples)
    batch["ref_chosen_logps"] = torch.stack([c for c, _ in pairs])
    batch["ref_rejected_logps"] = torch.stack([r for _, r in pairs])
    llamas.policy_torch.zero_grad()
    loss = trainer.compute_loss(llamas.policy_torch, batch)
    loss.backward()
    return loss.item(), _grads_as_kdjax(llamas.policy_torch, llamas.policy[1], llamas.config)


def test_dpo_matches_trl_and_stored_reference_equals_online(llamas, rng, tmp_path):
    rows = _rows(rng)
    built = build_preference_store(
        tmp_path / "pref", [r[:n] for r, n in zip(rows["prompt"], rows["prompt_len"])],
        [[c[:n] for c, n, ok in zip(cs, ns, vs) if ok] for cs, ns, vs in
         zip(rows["candidates"], rows["candidate_len"], rows["valid"])],
        [s[v] for s, v in zip(rows["scores"], rows["valid"])], tokenizer="tok-fp",
        vocab_size=V, prompt_len=P, completion_len=C, num_candidates=K, skip_tied=False)
    assert built["rows"] == B - 1 and built["skipped_few_candidates"] == 1  # row 2
    prefs = open_preference_store(built["path"])
    ref, stats = precompute_reference_logps(prefs, llamas.reference, batch_size=2)
    rows = prefs.read(np.arange(prefs.num_rows))  # rows 0, 1, 3 of the input
    # each row's candidates scored once: two forwards of two rows (the last one padded)
    assert stats == {"rows": 3, "forwards": 2, "sequences": int(rows["valid"].sum())}
    assert_close(ref, _torch_logps(llamas.reference_torch, rows).detach().numpy(), rtol=1e-4,
                 atol=1e-4)
    stored = open_preference_store(with_reference_logps(
        prefs, ref, tmp_path / "pref_ref", reference_fingerprint="reference-seed-1")["path"])
    stored.check_reference("reference-seed-1")
    batch = _jax(stored.read(np.arange(stored.num_rows)))

    beta = 0.1
    (v_on, _), g_on = _value_and_grad(RankingObjective("dpo", beta=beta, reference="online"),
                                      llamas.policy, llamas.reference)(batch)
    (v_st, m_st), g_st = _value_and_grad(RankingObjective("dpo", beta=beta), llamas.policy)(batch)
    assert_close(v_st, v_on, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_st), jax.tree.leaves(g_on)):
        assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert_close(m_st["skipped"].sum, 1.0)  # the all-tied row
    assert_close(m_st["loss"].count, 2.0)

    loss_trl, g_trl = _trl_dpo(llamas, rows, beta, tmp_path)
    assert_close(v_st, loss_trl, rtol=2e-5)
    _assert_grads(g_st, g_trl)


# ------------------------------------------------------------------ float64 references


def _reference_loss(method, lp_sum, rows, ref=None, *, beta, gamma=0.5, temperature=1.0,
                    sft=0.0, pairs="best_worst", label_smoothing=0.0):
    """The papers' formulas in float64 torch on whole-sequence log-probs; the mean over
    usable prompts (≥ 2 valid candidates, not all tied unless listwise)."""
    total, count = 0.0, 0
    for b in range(B):
        ok = np.nonzero(rows["valid"][b])[0]
        s = rows["scores"][b].astype(np.float64)
        if len(ok) < 2 or (method != "listwise_kl" and np.ptp(s[ok]) == 0):
            continue
        n = torch.as_tensor(rows["candidate_len"][b].astype(np.float64))
        avg = method in ("simpo", "rrhf", "pro", "listwise_kl")
        lp = lp_sum[b] / n if avg else lp_sum[b]
        if method in ("dpo", "ipo", "simpo"):
            if pairs == "best_worst":
                cand = [(ok[np.argmax(s[ok])], ok[np.argmin(s[ok])])]
            else:
                cand = [(i, j) for i in ok for j in ok if s[i] > s[j]]
            terms = []
            for i, j in cand:
                if method == "simpo":
                    terms.append(-torch.nn.functional.logsigmoid(beta * (lp[i] - lp[j]) - gamma))
                    continue
                delta = (lp[i] - lp[j]) - (ref[b, i] - ref[b, j])
                eps, logsig = label_smoothing, torch.nn.functional.logsigmoid
                terms.append(-(1 - eps) * logsig(beta * delta) - eps * logsig(-beta * delta)
                             if method == "dpo" else (delta - 1 / (2 * beta)) ** 2)
            loss = sum(terms) / len(terms)
        elif method == "rrhf":
            loss = sum(torch.relu(lp[i] - lp[j]) for i in ok for j in ok if s[i] < s[j])
        elif method == "pro":
            order = sorted(ok, key=lambda i: (-s[i], i))
            loss = -sum(lp[order[k]] - torch.logsumexp(lp[order[k:]], 0)
                        for k in range(len(order)))
        else:
            t = torch.log_softmax(torch.as_tensor(s[ok]) / temperature, 0)
            q = torch.log_softmax(lp[ok] / temperature, 0)
            loss = (t.exp() * (t - q)).sum()
        if sft:
            best = ok[np.argmax(s[ok])]
            loss = loss + sft * -(lp_sum[b, best] / n[best])
        total, count = total + loss, count + 1
    return total / count, count


def _terms(obj, lp, ref, batch):
    """`ranking_terms` on given per-candidate log-probs, with the objective's selection."""
    idx = (best_worst(batch["scores"], batch["valid"])
           if obj.method in ("dpo", "ipo", "simpo") and obj.pairs == "best_worst"
           else jnp.broadcast_to(jnp.arange(K), (B, K)))
    pick = {k: jnp.take_along_axis(batch[k], idx, 1)
            for k in ("scores", "valid", "candidate_len")}
    has = usable(batch["scores"], batch["valid"], tied_ok=obj.method == "listwise_kl")
    take = lambda x: None if x is None else jnp.take_along_axis(x, idx, 1)
    return ranking_terms(obj, take(lp), take(ref), pick["scores"], pick["valid"],
                         jnp.where(pick["valid"], pick["candidate_len"], 0), has)


TERMS = {  # pure loss terms on whole-sequence log-probs (the model path: the e2e tests)
    "dpo": RankingObjective("dpo", beta=0.3, label_smoothing=0.1),
    "ipo": RankingObjective("ipo", beta=0.5),
    "ipo_all_pairs": RankingObjective("ipo", beta=0.5, pairs="all"),
    "simpo": RankingObjective("simpo", beta=2.0, gamma=0.3),
    "rrhf": RankingObjective("rrhf"),  # with its SFT term (weight 1)
    "pro": RankingObjective("pro", sft_weight=0.1),
    "listwise_kl": RankingObjective("listwise_kl", temperature=0.7),
}


@pytest.mark.parametrize("name", list(TERMS))
def test_loss_terms_match_float64_reference(llamas, rng, name):
    """Loss, counts and d loss / d log-probs on the policy's float64 whole-sequence
    log-probs (torch) vs the papers' formulas in float64 torch."""
    obj = TERMS[name]
    rows = _rows(rng)
    lp = _torch_logps(llamas.policy_torch, rows).detach().requires_grad_(True)
    ref = _torch_logps(llamas.reference_torch, rows).detach()

    def f(x, r, batch):
        loss, metrics = _terms(obj, x, r, batch)
        return loss.mean(), metrics

    (value, metrics), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(
        jnp.asarray(lp.detach().numpy(), jnp.float32), jnp.asarray(ref.numpy(), jnp.float32),
        _jax(rows))
    expected, count = _reference_loss(obj.method, lp, rows, ref, beta=obj.beta_value,
                                      gamma=obj.gamma, temperature=obj.temperature,
                                      sft=obj.sft, pairs=obj.pairs,
                                      label_smoothing=obj.label_smoothing)
    expected.backward()
    assert_close(metrics["loss"].count, count)
    assert_close(metrics["skipped"].sum, B - count)
    assert_close(value, expected.item(), rtol=2e-5, atol=1e-6)
    assert_close(grad, lp.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(grad))


E2E = RankingObjective("dpo", beta=0.2, reference="online", pairs="all", sft_weight=0.3)


def test_all_pairs_with_sft_matches_float64_reference_end_to_end(llamas, rng):
    """Every candidate through layout, model and fused log-probs; value and parameter
    gradients vs the float64 torch models (online reference, ties, padding, skips)."""
    rows = _rows(rng)
    (value, metrics), grads = _value_and_grad(E2E, llamas.policy, llamas.reference)(
        _jax(rows))
    llamas.policy_torch.zero_grad()
    lp = _torch_logps(llamas.policy_torch, rows)
    ref = _torch_logps(llamas.reference_torch, rows).detach()
    expected, count = _reference_loss("dpo", lp, rows, ref, beta=E2E.beta_value,
                                      sft=E2E.sft, pairs="all")
    expected.backward()
    assert_close(metrics["loss"].count, count)
    assert_close(value, expected.item(), rtol=1e-4, atol=1e-6)
    _assert_grads(grads, _grads_as_kdjax(llamas.policy_torch, llamas.policy[1], llamas.config))
    keep = rows["valid"][:2]  # the usable rows' candidates
    kl = (lp.detach() - ref).numpy()[:2][keep].sum()
    tokens = rows["candidate_len"][:2][keep].sum()
    assert_close(metrics["kl_ref"].mean(), kl / tokens, rtol=1e-4)


def test_distillm2_matches_float64_reference(llamas, rng):
    """(2 − β)·SKL_α on the teacher's (best) response + β·SRKL_α on the student's (worst),
    token means per sequence, plus a CE term on the teacher's response."""
    obj = RankingObjective("distillm2", beta=1.3, skew_alpha=0.2, sft_weight=0.5)
    rows = _rows(rng)
    (value, metrics), grads = _value_and_grad(obj, llamas.policy, llamas.reference)(
        _jax(rows))

    a, beta = obj.skew_alpha, obj.beta_value
    llamas.policy_torch.zero_grad()
    total, count = 0.0, 0
    for b in (0, 1):  # the usable rows
        s = np.where(rows["valid"][b], rows["scores"][b], np.nan)
        for k, kind in ((int(np.nanargmax(s)), "teacher"), (int(np.nanargmin(s)), "student")):
            p, c = rows["prompt_len"][b], rows["candidate_len"][b, k]
            seq = torch.as_tensor(np.concatenate([rows["prompt"][b, :p],
                                                  rows["candidates"][b, k, :c]])[None])
            lq = torch.log_softmax(llamas.policy_torch(seq).logits[0, p - 1:p + c - 1], -1)
            with torch.no_grad():
                lp = torch.log_softmax(
                    llamas.reference_torch(seq).logits[0, p - 1:p + c - 1], -1)
            if kind == "teacher":
                mix = torch.logaddexp(np.log(a) + lp, np.log(1 - a) + lq)
                d = (lp.exp() * (lp - mix)).sum(-1).mean() * (2 - beta)
                nll = -lq.gather(1, seq[0, p:, None]).mean()
                total = total + d + obj.sft * nll
            else:
                mix = torch.logaddexp(np.log(a) + lq, np.log(1 - a) + lp)
                total = total + beta * (lq.exp() * (lq - mix)).sum(-1).mean()
        count += 1
    expected = total / count
    expected.backward()
    assert_close(metrics["loss"].count, 2.0)
    assert_close(value, expected.item(), rtol=1e-4)
    _assert_grads(grads, _grads_as_kdjax(llamas.policy_torch, llamas.policy[1], llamas.config))


def test_sharded_equals_single_device(llamas, rng):
    """On 4 data-parallel devices each computes its own sequences; same loss and grads."""
    mesh = make_mesh(data=4, devices=jax.devices()[:4])
    batch = _jax(_rows(rng))
    (v1, _), g1 = _value_and_grad(E2E, llamas.policy, llamas.reference)(batch)
    (v4, _), g4 = _value_and_grad(E2E, llamas.policy, llamas.reference, mesh)(batch)
    assert_close(v4, v1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        assert_close(a, b, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ training


def test_dpo_training_raises_reward_accuracy_and_margin(rng):
    """Chosen candidates use ids from one half of the vocabulary, rejected ones from the
    other; 30 Adam steps of DPO (reference = the starting weights, stored) make the
    policy's implicit reward prefer the chosen ones on held-out rows."""
    vocab, b, k, p, c = 32, 8, 2, 4, 5
    cfg = DecoderConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=1,
                        num_heads=2, tie_word_embeddings=True)
    graphdef, params, rest = split_model(Decoder(cfg, rngs=nnx.Rngs(0)))

    def rows(n):
        cand = np.stack([rng.integers(2, vocab // 2, (n, c)),
                         rng.integers(vocab // 2, vocab, (n, c))], 1).astype(np.int32)
        return {"prompt": jnp.asarray(rng.integers(2, vocab, (n, p)), jnp.int32),
                "prompt_len": jnp.full((n,), p, jnp.int32), "candidates": jnp.asarray(cand),
                "candidate_len": jnp.full((n, k), c, jnp.int32),
                "scores": jnp.tile(jnp.array([1.0, 0.0]), (n, 1)),
                "valid": jnp.ones((n, k), bool)}

    ref_fn = jax.jit(lambda prm, bt: reference_logps(graphdef, prm, rest, bt))
    batches = [rows(b) for _ in range(4)]
    held = rows(b)
    for bt in [*batches, held]:
        bt["ref_logps"] = ref_fn(params, bt)  # once per row, before training
    obj = RankingObjective("dpo", beta=0.5)
    tx = optax.adam(3e-2)

    @jax.jit
    def step(prm, opt, bt):
        def f(x):
            loss, metrics = obj({"model": x}, bt, graphdef=graphdef, step=jnp.int32(0),
                                rest=rest)
            return loss.mean(), metrics
        (_, metrics), g = jax.value_and_grad(f, has_aux=True)(prm)
        upd, opt = tx.update(g, opt, prm)
        return optax.apply_updates(prm, upd), opt, metrics

    opt = tx.init(params)
    _, _, before = step(params, opt, held)
    for i in range(30):
        params, opt, _ = step(params, opt, batches[i % len(batches)])
    _, _, after = step(params, opt, held)
    assert float(before["reward_accuracy"].mean()) == 0.0  # policy == reference: r = 0
    assert float(after["reward_accuracy"].mean()) >= 0.9
    assert float(after["reward_margin"].mean()) > float(before["reward_margin"].mean()) + 1.0
    assert float(after["kl_ref"].count) == b * k * c


# ------------------------------------------------------------------ bad input


def _trace(obj, split, batch, teacher=None):
    return jax.eval_shape(lambda prm: obj({"model": prm}, batch, graphdef=split[0],
                                          step=jnp.int32(0), teacher=teacher, rest=split[2]),
                          split[1])


def test_bad_input_raises_clear_errors(llamas, rng):
    rows = _rows(rng)
    batch = _jax(rows)
    with pytest.raises(ValueError, match="no 'ref_logps'.*precompute_reference_logps"):
        _trace(RankingObjective("dpo"), llamas.policy, batch)
    with pytest.raises(ValueError, match="no reference model was given"):
        _trace(RankingObjective("ipo", reference="online"), llamas.policy, batch)
    with pytest.raises(ValueError, match="distillm2.*needs the online teacher"):
        _trace(RankingObjective("distillm2"), llamas.policy, batch)
    with pytest.raises(ValueError, match="lacks \\['valid'\\]"):
        _trace(RankingObjective("simpo"), llamas.policy,
               {k: v for k, v in batch.items() if k != "valid"})
    one = {**batch, **{k: batch[k][:, :1] for k in ("candidates", "candidate_len", "scores",
                                                    "valid")}}
    with pytest.raises(ValueError, match="K >= 2 candidate slots.*K=1"):
        _trace(RankingObjective("rrhf"), llamas.policy, one)
    with pytest.raises(ValueError, match="shapes do not fit"):
        _trace(RankingObjective("pro"), llamas.policy, {**batch, "valid": batch["valid"][:2]})
    # DistiLLM-2's β curriculum (1 → 1.5) as a schedule of the step traces
    _trace(RankingObjective("distillm2", beta=optax.linear_schedule(1.0, 1.5, 10)),
           llamas.policy, batch, teacher=llamas.reference)
    for kw, msg in ((dict(method="dpo", reference="none"), "needs a frozen reference"),
                    (dict(method="rrhf", reference="stored"), "uses no reference"),
                    (dict(method="pro", pairs="all"), "pairs='all' applies"),
                    (dict(method="dpoo"), "did you mean 'dpo'"),
                    (dict(method="simpo", beta=-1.0), "beta must be > 0"),
                    (dict(method="dpo", label_smoothing=0.7), "label_smoothing"),
                    (dict(method="dpo", beta=optax.constant_schedule(0.1)), "schedule"),
                    (dict(method="distillm2", beta=2.5), "in \\(0, 2\\)")):
        with pytest.raises(ConfigError, match=msg):
            RankingObjective(**kw)


def test_all_skipped_batch_is_zero_not_nan(llamas, rng):
    """No usable prompt (lone candidates, all ties): loss 0 over count 0, every prompt
    counted as skipped, finite zero gradients (the step then divides by max(count, 1))."""
    rows = _rows(rng)
    rows["valid"][:, 1:] = False
    rows["valid"][3] = True
    rows["scores"][3] = 1.0
    (value, metrics), grads = _value_and_grad(E2E, llamas.policy, llamas.reference)(
        _jax(rows))
    assert float(value) == 0.0 and float(metrics["loss"].count) == 0.0
    assert float(metrics["skipped"].sum) == B
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))
