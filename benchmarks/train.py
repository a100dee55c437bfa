"""Training throughput: a kdjax distillation step vs a plain transformers + torch one.

Both train the same student (same weights, loaded from one Hugging Face directory) against
the same online teacher on the same batch: student and teacher forward, forward KL at
T = 1 over the vocabulary, backward, global-norm clipping and AdamW. kdjax runs its
jitted `train_step` (fused chunked KL, teacher under stop_gradient); torch runs eager
`LlamaForCausalLM` with the teacher under `torch.no_grad()`.

Reported: tokens/s (median over repeats, after warm-up), achieved FLOP/s with the
6·N_student + 2·N_teacher rule (the teacher counted forward only, N including the lm_head
and excluding the embedding lookup, plus attention), the kdjax/torch ratio measured in
the same run, and the compiled memory of the kdjax step.

    python benchmarks/train.py            # full (a few minutes on 2 CPU cores)
    python benchmarks/train.py --quick    # smoke (seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdjax import sharding as shd
from kdjax.models import Decoder, DecoderConfig, from_pretrained, save_pretrained
from kdjax.train.metrics import forward_flops_per_token
from kdjax.train.objective import Objective
from kdjax.train.state import OptimizerSpec, create_train_state, split_model
from kdjax.train.step import make_train_step

SIZES = {  # (student, teacher) shapes, batch, length, vocab
    "full": dict(student=dict(hidden_size=256, intermediate_size=768, num_layers=4,
                              num_heads=8),
                 teacher=dict(hidden_size=512, intermediate_size=1536, num_layers=6,
                              num_heads=8),
                 batch=8, seq_len=256, vocab=8192),
    "quick": dict(student=dict(hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=4),
                  teacher=dict(hidden_size=128, intermediate_size=256, num_layers=2,
                               num_heads=4),
                  batch=4, seq_len=64, vocab=1024),
}


def _cfg(dims, vocab, seq_len):
    return DecoderConfig(vocab_size=vocab, max_position_embeddings=seq_len, family="llama",
                         tie_word_embeddings=False, **dims)


def _flops_per_token(cfg: DecoderConfig, seq_len: int) -> float:
    """Forward FLOPs per token: weights (no embedding lookup, with lm_head) + attention."""
    h, m, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    attn = h * cfg.head_dim * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    params = n * (attn + 3 * h * m) + h * cfg.vocab_size
    return forward_flops_per_token(params, num_layers=n, seq_len=seq_len,
                                   attention_dim=cfg.num_heads * cfg.head_dim)


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_kdjax(s_dir, t_dir, batch, repeats):
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    student = from_pretrained(s_dir, dtype="float32", param_dtype="float32")
    teacher = split_model(from_pretrained(t_dir, dtype="float32", param_dtype="float32"))
    spec = OptimizerSpec(learning_rate=1e-4, total_steps=10_000, weight_decay=0.01,
                         max_grad_norm=1.0)
    tx = spec.build()
    state = create_train_state(student, tx, mesh=mesh, seed=0)
    obj = Objective(alpha=0.0, teacher_source="online")
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = make_train_step(obj, tx, state=state, mesh=mesh, batch_sharding=sharding,
                           teacher=teacher)
    batch = jax.device_put(batch, sharding)
    box = [state]
    with jax.set_mesh(mesh):
        compiled = step.jitted.lower(state, batch, teacher[1:]).compile()

        def one():
            box[0], m = step(box[0], batch)
            jax.block_until_ready(m["loss"].sum)

        seconds = _median_time(one, repeats)
    mem = compiled.memory_analysis()
    peak = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes +
                                     mem.output_size_in_bytes - mem.alias_size_in_bytes)
    return seconds, peak


def bench_torch(s_dir, t_dir, batch, repeats):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    student = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32).train()
    teacher = AutoModelForCausalLM.from_pretrained(t_dir, dtype=torch.float32).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.01)
    tokens = torch.tensor(np.asarray(batch["tokens"]), dtype=torch.long)
    mask = torch.tensor(np.asarray(batch["loss_mask"]), dtype=torch.float32)

    def one():
        with torch.no_grad():
            logp = torch.log_softmax(teacher(tokens).logits.float(), -1)
        logq = torch.log_softmax(student(tokens).logits.float(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        loss = (kl * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    return _median_time(one, repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (median)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.md"))
    args = p.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    repeats = args.repeats or (3 if args.quick else 5)
    b, length, vocab = size["batch"], size["seq_len"], size["vocab"]
    s_cfg, t_cfg = _cfg(size["student"], vocab, length), _cfg(size["teacher"], vocab, length)
    rng = np.random.default_rng(0)
    batch = dict(tokens=rng.integers(0, vocab, (b, length)).astype(np.int32),
                 targets=rng.integers(0, vocab, (b, length)).astype(np.int32),
                 loss_mask=np.ones((b, length), bool), segment_ids=np.ones((b, length), np.int32),
                 positions=np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy())
    with tempfile.TemporaryDirectory() as tmp:
        s_dir, t_dir = Path(tmp) / "student", Path(tmp) / "teacher"
        save_pretrained(Decoder(s_cfg, rngs=nnx.Rngs(0)), s_dir)
        save_pretrained(Decoder(t_cfg, rngs=nnx.Rngs(1)), t_dir)
        kd_s, kd_mem = bench_kdjax(s_dir, t_dir, batch, repeats)
        pt_s = bench_torch(s_dir, t_dir, batch, repeats)
    tokens = b * length
    flops = 3 * _flops_per_token(s_cfg, length) + _flops_per_token(t_cfg, length)
    rows = [("kdjax (jit, fused KL)", kd_s), ("transformers + torch (eager)", pt_s)]
    lines = [
        "## Training step: kdjax vs transformers + torch (online teacher, forward KL)", "",
        f"Command: `python benchmarks/train.py{' --quick' if args.quick else ''}` on "
        f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores), float32. Student "
        f"{size['student']}, teacher {size['teacher']}, vocab {vocab}, batch {b} × {length} "
        f"tokens; median of {repeats} steps after 2 warm-up steps. FLOPs per token: "
        f"3 × student forward + 1 × teacher forward = {flops:.3g}.", "",
        "| implementation | step (ms) | tokens/s | achieved GFLOP/s |", "|---|---|---|---|"]
    for name, sec in rows:
        lines.append(f"| {name} | {sec * 1e3:.1f} | {tokens / sec:,.0f} | "
                     f"{flops * tokens / sec / 1e9:.2f} |")
    lines += ["", f"kdjax / torch throughput: **{pt_s / kd_s:.2f}×**. Compiled memory of the "
              f"kdjax step (arguments + outputs + temporaries − aliased): "
              f"{(kd_mem or 0) / 2**20:.1f} MiB.", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
