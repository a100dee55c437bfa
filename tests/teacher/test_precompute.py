"""End to end: tiny teacher + token store → precompute → inspect → read back."""

import json

import jax
import numpy as np
import pytest
import yaml

from kdjax.cli import main
from kdjax.sharding import make_mesh
from kdjax.storage import StoreIncompleteError, StoreLockedError, StoreMismatchError, WriterLock
from kdjax.teacher import (
    PrecomputeConfig,
    hidden_from_batch,
    open_teacher_store,
    precompute,
    teacher_from_batch,
)
from tests.teacher import helpers
from tests.tolerances import assert_close

N, K = 32, 5


def _forward(model, rows, hidden_layers=()):
    """The teacher's forward on token-store rows, jitted (eager would compile op by op)."""
    fn = jax.jit(lambda t, s, p: model(t, segment_ids=s, positions=p,
                                       hidden_layers=hidden_layers))
    return fn(rows["tokens"], rows["segment_ids"], rows["positions"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    teacher = helpers.save_tiny_teacher(root / "teacher")
    tokens = helpers.write_token_store(root / "tokens", num_rows=20, shard_rows=8)
    return root, teacher, tokens


@pytest.fixture(scope="module")
def reference(tiny):
    """The teacher's own logits and last hidden state for every token-store row (f64)."""
    from kdjax.data import open_token_store
    from kdjax.models import from_pretrained

    _, teacher, tokens = tiny
    store = open_token_store(tokens)
    rows = store.read(np.arange(store.num_rows))
    out = _forward(from_pretrained(teacher), rows, hidden_layers=(2,))
    logits = np.asarray(out.logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return dict(rows=rows, logits=logits, logp=logp, hidden=np.asarray(out.hidden_states[2]))


@pytest.fixture(scope="module")
def stores(tiny):
    """One store per mode: topk through `kdjax precompute --config`, the others in process."""
    root, teacher, tokens = tiny
    # float32: these stores are compared with the f32 reference to 2e-5 (the default
    # bfloat16 teacher is tested against an f32 one in test_teacher_dtype.py)
    base = dict(teacher=teacher, tokens=tokens, batch_size=8, shard_rows=8, dtype="float32",
                progress=False)
    cfg_file = root / "topk.yaml"
    cfg_file.write_text(yaml.safe_dump({**base, "mode": "topk", "k": K,
                                        "hidden_layers": [-1]}))
    assert main(["precompute", "--config", str(cfg_file), f"out={root / 'topk'}"]) == 0
    summaries = {}
    for mode, extra in (("sampled", dict(num_samples=N, num_slots=N, seed=3)),
                        ("dense", {})):
        summaries[mode] = precompute(PrecomputeConfig(out=str(root / mode), mode=mode,
                                                      **base, **extra))
    return {m: str(root / m) for m in ("topk", "sampled", "dense")}, summaries


def test_topk_store_is_the_teachers_top_k(stores, reference):
    store = open_teacher_store(stores[0]["topk"])
    got = store.read(np.arange(store.num_rows), ["ids", "logprobs", "tail", "hidden_2",
                                                 "tokens", "loss_mask"])
    _, want_ids = jax.lax.top_k(jax.nn.log_softmax(reference["logits"].astype(np.float32)), K)
    np.testing.assert_array_equal(got["ids"], np.asarray(want_ids))
    want = np.take_along_axis(reference["logp"], got["ids"].astype(np.int64), -1)
    assert_close(got["logprobs"], want, atol=2e-5)
    assert_close(got["tail"], 1 - np.exp(want).sum(-1), atol=2e-5)
    assert_close(got["hidden_2"], reference["hidden"], "bfloat16", rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(got["tokens"], reference["rows"]["tokens"])
    np.testing.assert_array_equal(got["loss_mask"], reference["rows"]["loss_mask"])
    m = store.manifest
    assert m["mode"] == "topk" and m["k"] == K and m["hidden_layers"] == [2]
    mask = reference["rows"]["loss_mask"]
    assert m["stats"]["mass_covered"] == pytest.approx(np.exp(want)[mask].sum(-1).mean(),
                                                       abs=1e-5)


def test_dense_store_is_the_teachers_logits(stores, reference):
    store = open_teacher_store(stores[0]["dense"])
    got = store.read(np.arange(store.num_rows))
    assert set(got) == {"logits"}
    assert_close(got["logits"], reference["logits"], atol=2e-5)


def test_sampled_store_is_a_multinomial_sample_of_the_teacher(stores, reference):
    """With U = N nothing overflows: counts sum to N. Each count c_v ~ Binomial(N, p_v), so
    S = Σ_positions c_top1 has mean Σ N p_top1 and variance Σ N p(1−p); we require S within
    5 standard deviations (false alarm < 1e-6), and no draw of a zero-mass id."""
    store = open_teacher_store(stores[0]["sampled"])
    got = store.read(np.arange(store.num_rows))
    ids, counts = got["ids"].astype(np.int64), got["counts"].astype(np.int64)
    np.testing.assert_array_equal(counts.sum(-1), N)
    p = np.exp(reference["logp"])
    assert np.all(np.take_along_axis(p, ids, -1)[counts > 0] > 0)
    top1 = p.argmax(-1)
    c_top1 = np.where(ids == top1[..., None], counts, 0).sum(-1)
    p1 = p.max(-1)
    mean, sd = (N * p1).sum(), np.sqrt((N * p1 * (1 - p1)).sum())
    assert abs(c_top1.sum() - mean) < 5 * sd
    stats = store.manifest["stats"]
    assert stats["overflow_positions"] == 0 and stats["dropped_sample_rate"] == 0.0
    assert store.manifest["num_samples"] == N and store.manifest["seed"] == 3


def test_inspect_reports_and_checks_every_chunk(stores, capsys):
    for mode, path in stores[0].items():
        assert main(["inspect", path]) == 0
        text = capsys.readouterr().out
        assert f"mode {mode}" in text and "every chunk read back intact" in text
    assert main(["inspect", stores[0]["sampled"], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    stats = report["manifest"]["stats"]
    # U = N: nothing overflows, so the ids stored are all the ids drawn
    assert report["stored_ids_per_position"] == pytest.approx(stats["distinct_per_position"])
    assert report["sample_fraction_kept"] == pytest.approx(1.0)
    assert report["disk_bytes_per_token"] > report["signal_bytes_per_token"] > 0


def test_summary_and_teacher_from_batch(stores):
    paths, summaries = stores
    s = summaries["sampled"]
    assert s["rows"] == 20 and s["shards"] == 3 and s["tokens_per_s"] > 0
    for mode in ("sampled", "topk", "dense"):
        store = open_teacher_store(paths[mode])
        batch = {f"teacher_{k}": v for k, v in store.read(np.array([4, 17])).items()}
        t = teacher_from_batch(batch, store.manifest, flatten=True)
        if mode == "dense":
            assert t.shape == (32, 97)
            continue
        assert t.ids.dtype == np.int32 and t.ids.shape[0] == 32
        if mode == "sampled":
            assert t.num_samples == N and t.counts.dtype == np.int32
        else:
            assert t.logprobs.dtype == np.float32 and t.tail == "renormalize"
            assert hidden_from_batch(batch, store.manifest)[2].shape == (2, 16, 32)
    with pytest.raises(KeyError, match="teacher_counts"):
        teacher_from_batch({"teacher_ids": np.zeros((1, 2))}, {"mode": "sampled",
                                                                "num_samples": 4})


def test_mismatched_store_is_refused(stores, tiny, tmp_path):
    from kdjax.data import open_token_store

    root, _, tokens = tiny
    store = open_teacher_store(stores[0]["topk"])
    store.check_compatible(open_token_store(tokens), vocab_size=97)
    other = open_token_store(helpers.write_token_store(tmp_path / "other", num_rows=20,
                                                       seed=1))
    with pytest.raises(StoreMismatchError, match="its data_fingerprint is"):
        store.check_compatible(other)
    with pytest.raises(StoreMismatchError, match="its vocab_size is 97 but the run has 50"):
        store.check_compatible(vocab_size=50)
    store.check_compatible(vocab_size=128)  # a padded student vocabulary holds every id
    with pytest.raises(StoreMismatchError, match="between the tokenizer's 97 and the teacher"):
        open_teacher_store(stores[0]["dense"]).check_compatible(vocab_size=128)
    with pytest.raises(StoreMismatchError, match="seq_len is 16 but the run has 32"):
        store.check_compatible(seq_len=32)
    with pytest.raises(StoreIncompleteError):
        open_teacher_store(tmp_path / "nothing")


def test_second_writer_and_changed_plan_are_refused(stores, tiny):
    root, teacher, tokens = tiny
    cfg = PrecomputeConfig(teacher=teacher, tokens=tokens, out=stores[0]["topk"],
                           mode="topk", k=K, hidden_layers=(-1,), batch_size=8, shard_rows=8,
                           dtype="float32", progress=False)
    with WriterLock(cfg.out, "writer-0"), pytest.raises(StoreLockedError, match="another"):
        precompute(cfg)
    changed = PrecomputeConfig(**{**cfg.to_dict(), "k": K + 1})
    with pytest.raises(StoreMismatchError, match="different plan"):
        precompute(changed)


def test_resume_with_another_signal_version_is_refused(stores, tiny, monkeypatch):
    # a store begun by code that drew differently must not be finished by this code
    from kdjax.teacher import signal

    root, teacher, tokens = tiny
    cfg = PrecomputeConfig(teacher=teacher, tokens=tokens, out=stores[0]["sampled"],
                           mode="sampled", num_samples=N, num_slots=N, seed=3, batch_size=8,
                           shard_rows=8, dtype="float32", progress=False)
    monkeypatch.setattr(signal, "SIGNAL_VERSION", signal.SIGNAL_VERSION + 1)
    with pytest.raises(StoreMismatchError, match=r"differs in: signal_version\)"):
        precompute(cfg)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_chunk_is_a_clear_error(stores, tmp_path, capsys, damage):
    import shutil

    from kdjax.storage import StoreCorruptError

    path = shutil.copytree(stores[0]["topk"], tmp_path / "store")
    chunk = path / "arrays" / "logprobs" / "c" / "1" / "0" / "0"  # shard 1 = rows [8, 16)
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0x40
        chunk.write_bytes(bytes(data))
    elif damage == "truncate":
        chunk.write_bytes(bytes(data[: len(data) // 2]))
    else:
        chunk.unlink()
    store = open_teacher_store(path)
    store.read(np.array([0, 19]))  # other shards still read
    with pytest.raises(StoreCorruptError, match=r"array 'logprobs'.*shard 1, rows \[8, 16\)"):
        store.read(np.arange(8, 16))
    assert main(["inspect", str(path)]) == 3  # data damage
    text = capsys.readouterr().out
    assert "CORRUPT: 1 unreadable chunk(s)" in text and "'logprobs'" in text
    if damage != "delete":
        assert "DATA_LOSS" in text and "c/1/0/0" in text


def test_vocab_over_65535_uses_32_bit_ids(tmp_path):
    v = 70_000
    tokens = helpers.write_token_store(tmp_path / "tokens", num_rows=4, vocab_size=v,
                                       shard_rows=4)
    model = helpers.tiny_decoder(vocab_size=v, hidden=16, layers=1)
    cfg = PrecomputeConfig(tokens=tokens, out=str(tmp_path / "store"), mode="topk", k=3,
                           batch_size=4, shard_rows=4, teacher_fingerprint="big-vocab",
                           progress=False)
    precompute(cfg, model=model, mesh=make_mesh(devices=jax.devices()[:1]))
    store = open_teacher_store(cfg.out)
    assert store.manifest["arrays"]["ids"]["dtype"] == "uint32"
    assert store.manifest["arrays"]["tokens"]["dtype"] == "uint32"
    got = store.read(np.arange(4), ["ids", "tokens"])
    rows = helpers_rows(tokens)
    np.testing.assert_array_equal(got["tokens"], rows["tokens"])
    out = _forward(model, rows)
    _, want = jax.lax.top_k(jax.nn.log_softmax(out.logits), 3)
    np.testing.assert_array_equal(got["ids"], np.asarray(want))
    assert got["ids"].max() > 65_535 and got["tokens"].max() > 65_535


def helpers_rows(tokens):
    from kdjax.data import open_token_store

    store = open_token_store(tokens)
    return store.read(np.arange(store.num_rows))


def test_fused_loss_reads_the_store(stores, rng):
    """Store → teacher_from_batch → fused_distill equals the formula in float64 NumPy."""
    from kdjax.losses import fused_distill

    rows = np.array([2, 11, 19])
    hidden = rng.normal(size=(len(rows) * 16, 8)).astype(np.float32)
    lm_head = rng.normal(size=(8, 97)).astype(np.float32)
    z = hidden.astype(np.float64) @ lm_head
    logq = z - z.max(-1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
    for mode in ("sampled", "topk", "dense"):
        store = open_teacher_store(stores[0][mode])
        read = store.read(rows, [*store.default_arrays(), "loss_mask"])
        mask = read.pop("loss_mask").reshape(-1)
        batch = {f"teacher_{k}": v for k, v in read.items()}
        teacher = teacher_from_batch(batch, store.manifest, flatten=True)
        loss, _ = fused_distill(hidden, lm_head, teacher, mask=mask)
        if mode == "dense":
            t = read["logits"].reshape(-1, 97).astype(np.float64)
            logp = t - t.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            per_token = (np.exp(logp) * (logp - logq)).sum(-1)
        else:
            ids = read["ids"].reshape(len(mask), -1).astype(np.int64)
            if mode == "sampled":
                w = read["counts"].reshape(len(mask), -1) / N
            else:
                w = np.exp(read["logprobs"].reshape(len(mask), -1).astype(np.float64))
                w /= w.sum(-1, keepdims=True)
            lq = np.take_along_axis(logq, ids, -1)
            per_token = np.where(w > 0, w * (np.log(np.where(w > 0, w, 1)) - lq), 0).sum(-1)
        assert_close(loss.mean(), per_token[mask].mean(), rtol=1e-4)
