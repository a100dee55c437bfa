"""Training step: kdjax vs torch, distillation and plain language modelling, one run.

Every row trains the same student (same weights, loaded from one Hugging Face directory)
on the same batch with global-norm clipping and AdamW, in float32, each with its own copy
of the student and optimizer:

  distillation (forward KL at T = 1 over the vocabulary against an online teacher,
  teacher forward included, α = 0: no hard-label term):
    kdjax          the jitted `train_step` (fused chunked KL: no [B, L, V] array);
    torch eager    transformers `LlamaForCausalLM` student and teacher, full [B, L, V]
                   logits and log-softmaxes (the common PyTorch recipe);
    torch chunked  the same models' trunks, then the KL over chunks of tokens by a custom
                   autograd Function that computes each chunk's logits, loss and
                   gradients in its forward pass and keeps only the [tokens, H] and
                   [V, H] gradients (the Liger-kernel recipe): no [B, L, V] array;
  language modelling (next-token CE on the batch's targets, no teacher):
    kdjax          the jitted `train_step` with α = 1 (fused chunked CE);
    torch eager    transformers logits + `cross_entropy` (materialized [B, L, V] logits);
    torch chunked  the same custom Function with the CE term only.

Both torch chunked rows use kdjax's own chunk rule (C·V·4 bytes ≈ 32 MiB of f32 logits
per chunk). torch runs with `torch.set_num_threads` = the cores this process may use,
which is what XLA:CPU sizes its thread pools from. The rows are timed interleaved (one
step of each in turn), medians after warm-up steps, so that changes in load on a shared
machine hit every row alike. The first step's loss is printed for each row: rows of one
task start from the same weights and batch, so they agree.

Reported: step time, tokens/s, achieved FLOP/s with the 6·N_student (+ 2·N_teacher)
rule (N including the lm_head and excluding the embedding lookup, plus attention), the
ratios, and the compiled memory of the kdjax steps.

    python benchmarks/train.py --single-thread    # one core each (results/train.md)
    python benchmarks/train.py --out benchmarks/results/train_2cores.md   # all cores
    python benchmarks/train.py --quick    # smoke (seconds)

The full sizes take ~5 min on 2 CPU cores. On a machine shared with other jobs torch's
OpenMP threads slow down far more than XLA's when they lose their core, which inflates
the multi-threaded ratios; the one-core run is the robust comparison there.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc

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
CHUNK_BYTES = 32 * 2**20  # f32 logits per torch chunk, as kdjax's `auto_chunk_size`


def build_parser(parser=None):
    p = bc.new_parser(__doc__, parser)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per row (median; "
                   "default 5, 3 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    p.add_argument("--single-thread", action="store_true",
                   help="pin the process to one core: one thread for both XLA and torch, "
                   "which other jobs on a shared machine disturb far less")
    p.add_argument("--out", default=str(bc.RESULTS / "train.md"))
    return p


def _cfg(dims, vocab, seq_len):
    from kdjax.models import DecoderConfig

    return DecoderConfig(vocab_size=vocab, max_position_embeddings=seq_len, family="llama",
                         tie_word_embeddings=False, **dims)


def _flops_per_token(cfg, seq_len: int) -> float:
    """Forward FLOPs per token: weights (no embedding lookup, with lm_head) + attention."""
    from kdjax.train.metrics import forward_flops_per_token

    h, m, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    attn = h * cfg.head_dim * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    params = n * (attn + 3 * h * m) + h * cfg.vocab_size
    return forward_flops_per_token(params, num_layers=n, seq_len=seq_len,
                                   attention_dim=cfg.num_heads * cfg.head_dim)


def kdjax_steps(s_dir, t_dir, batch):
    """{"kd": (step, compiled MiB), "lm": ...}: blocking callables returning the loss."""
    import jax

    from kdjax import sharding as shd
    from kdjax.models import from_pretrained
    from kdjax.train.config import OptimizerConfig
    from kdjax.train.objective import Objective
    from kdjax.train.state import create_train_state, split_model
    from kdjax.train.step import make_train_step

    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    teacher = split_model(from_pretrained(t_dir, dtype="float32", param_dtype="float32"))
    tx = OptimizerConfig(lr=1e-4, weight_decay=0.01, clip_norm=1.0).build(total_steps=10_000)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch = jax.device_put(batch, sharding)
    out = {}
    for name, obj, t in (("kd", Objective(alpha=0.0, teacher_source="online"), teacher),
                         ("lm", Objective(alpha=1.0, teacher_source="none"), None)):
        student = from_pretrained(s_dir, dtype="float32", param_dtype="float32")
        state = create_train_state(student, tx, mesh=mesh, seed=0)
        step = make_train_step(obj, tx, state=state, mesh=mesh, batch_sharding=sharding,
                               teacher=t)
        with jax.set_mesh(mesh):
            mem = step.jitted.lower(state, batch, t[1:] if t else (None, None)).compile(
            ).memory_analysis()
        box = [state]

        def one(step=step, box=box):
            with jax.set_mesh(mesh):
                box[0], m = step(box[0], batch)
                return float(m["loss"].sum) / float(m["loss"].count)

        peak = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                         + mem.output_size_in_bytes - mem.alias_size_in_bytes)
        out[name] = (one, peak)
    return out


def chunked_loss_fn():
    """`loss = ChunkedLoss.apply(h, w, h_t, w_t, weight, chunk)`: Σ_tokens weight ·
    (forward KL(softmax(h_t w_tᵀ) ‖ softmax(h wᵀ)) when h_t is given, else CE against
    `targets`), computed chunk by chunk; gradients of h and w are computed in the forward
    pass (only [N, H] and [V, H] are kept), so no [N, V] array exists at once."""
    import torch
    import torch.nn.functional as F

    class ChunkedLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w, h_t, w_t, targets, weight, chunk):
            total = torch.zeros((), dtype=torch.float32)
            dh, dw = torch.empty_like(h), torch.zeros_like(w)
            for s in range(0, h.shape[0], chunk):
                hc, wc = h[s:s + chunk], weight[s:s + chunk, None]
                logq = F.log_softmax(hc @ w.T, dim=-1)
                if h_t is not None:  # forward KL: Σ p (log p − log q); dz = q − p
                    logp = F.log_softmax(h_t[s:s + chunk] @ w_t.T, dim=-1)
                    p = logp.exp()
                    total += ((p * (logp - logq)).sum(-1, keepdim=True) * wc).sum()
                    dz = logq.exp().sub_(p).mul_(wc)
                else:  # CE: −log q[target]; dz = q − onehot
                    tc = targets[s:s + chunk, None]
                    total -= (logq.gather(1, tc) * wc).sum()
                    dz = logq.exp().scatter_add_(1, tc, -torch.ones_like(wc)).mul_(wc)
                dh[s:s + chunk] = dz @ w
                dw.addmm_(dz.T, hc)
            ctx.save_for_backward(dh, dw)
            return total

        @staticmethod
        def backward(ctx, grad):
            dh, dw = ctx.saved_tensors
            return dh * grad, dw * grad, None, None, None, None, None

    return ChunkedLoss.apply


def torch_steps(s_dir, t_dir, batch):
    """{"kd_eager", "kd_chunked", "lm_eager", "lm_chunked"}: blocking callables returning
    the loss, each with its own student and AdamW."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(bc.threads())
    teacher = AutoModelForCausalLM.from_pretrained(t_dir, dtype=torch.float32).eval()
    tokens = torch.tensor(np.asarray(batch["tokens"]), dtype=torch.long)
    targets = torch.tensor(np.asarray(batch["targets"]), dtype=torch.long).flatten()
    mask = torch.tensor(np.asarray(batch["loss_mask"]), dtype=torch.float32).flatten()
    weight = mask / mask.sum()  # the mean over unmasked tokens
    vocab = teacher.config.vocab_size
    chunk = max(64, min(4096, 1 << ((CHUNK_BYTES // (4 * vocab)).bit_length() - 1)))
    chunked = chunked_loss_fn()

    def kd_eager(student):
        with torch.no_grad():
            logp = F.log_softmax(teacher(tokens).logits.float(), -1)
        logq = F.log_softmax(student(tokens).logits.float(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1).flatten()
        return (kl * weight).sum()

    def kd_chunked(student):
        with torch.no_grad():
            h_t = teacher.model(tokens).last_hidden_state.flatten(0, 1)
        h = student.model(tokens).last_hidden_state.flatten(0, 1)
        return chunked(h, student.lm_head.weight, h_t, teacher.lm_head.weight, targets,
                       weight, chunk)

    def lm_eager(student):
        logits = student(tokens).logits.float().flatten(0, 1)
        return (F.cross_entropy(logits, targets, reduction="none") * weight).sum()

    def lm_chunked(student):
        h = student.model(tokens).last_hidden_state.flatten(0, 1)
        return chunked(h, student.lm_head.weight, None, None, targets, weight, chunk)

    def make(loss_fn):
        student = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32).train()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.01)

        def one():
            loss = loss_fn(student)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            return float(loss.detach())

        return one

    steps = {name: make(fn) for name, fn in (("kd_eager", kd_eager), ("kd_chunked", kd_chunked),
                                             ("lm_eager", lm_eager),
                                             ("lm_chunked", lm_chunked))}
    return steps, chunk


ROWS = [  # (key, task, implementation)
    ("kdjax_kd", "distillation", "kdjax (jit, fused chunked KL)"),
    ("kd_eager", "distillation", "torch eager (full [B, L, V] log-softmaxes)"),
    ("kd_chunked", "distillation", "torch, chunked KL (custom autograd Function)"),
    ("kdjax_lm", "LM (CE only)", "kdjax (jit, fused chunked CE)"),
    ("lm_eager", "LM (CE only)", "torch eager (logits + cross_entropy)"),
    ("lm_chunked", "LM (CE only)", "torch, chunked CE (custom autograd Function)"),
]
RATIOS = [  # (numerator row = the slower one's time, denominator = kdjax; what it compares)
    ("kd_eager", "kdjax_kd", "kdjax distillation step vs torch eager distillation that "
     "materializes full [B, L, V] logits and log-softmaxes of student and teacher (not "
     "like for like: kdjax never builds them)"),
    ("kd_chunked", "kdjax_kd", "kdjax distillation step vs the same distillation in torch "
     "with a chunked loss (neither side builds [B, L, V]): the fair distillation baseline"),
    ("lm_eager", "kdjax_lm", "kdjax LM step (fused chunked CE) vs the standard torch LM "
     "step (logits + cross_entropy): like-for-like language-model training"),
    ("lm_chunked", "kdjax_lm", "kdjax LM step vs torch with the same chunked CE: both "
     "sides without [B, L, V] logits"),
]


def run(args, argv) -> int:
    if args.single_thread:
        bc.single_thread()
    import jax
    import numpy as np
    from flax import nnx

    from kdjax.models import Decoder, save_pretrained

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
        kd = kdjax_steps(s_dir, t_dir, batch)
        torch_fns, chunk = torch_steps(s_dir, t_dir, batch)
    fns = {"kdjax_kd": kd["kd"][0], "kdjax_lm": kd["lm"][0], **torch_fns}
    first = {}

    def first_loss(key):
        def call():
            loss = fns[key]()
            first.setdefault(key, loss)
        return call

    keys = [k for k, _, _ in ROWS]
    times = dict(zip(keys, bc.timed_interleaved([first_loss(k) for k in keys], repeats,
                                                warmup=args.warmup)))
    tokens = b * length
    s_fwd, t_fwd = _flops_per_token(s_cfg, length), _flops_per_token(t_cfg, length)
    flops = {"distillation": 3 * s_fwd + t_fwd, "LM (CE only)": 3 * s_fwd}
    lines = [
        f"## Training step: kdjax vs torch, distillation and LM ({bc.threads()} thread(s) "
        "each)", "",
        f"Command: `{bc.command('train.py', argv)}` (or `kdjax bench train"
        f"{' ' + ' '.join(argv) if argv else ''}`)", "",
        f"{bc.machine(torch_version=True)}; device {jax.devices()[0].device_kind}; "
        f"torch threads {bc.threads()} (= the cores XLA uses). float32. Student "
        f"{size['student']}, teacher {size['teacher']}, vocab {vocab}, batch {b} × {length} "
        f"tokens; each row has its own student and AdamW (lr 1e-4, clip 1.0); torch chunks "
        f"of {chunk} tokens. Median of {repeats} steps per row after {args.warmup} warm-up "
        f"steps, rows interleaved. FLOPs per token: distillation 3 × student forward + 1 × "
        f"teacher forward = {flops['distillation']:.3g}; LM 3 × student forward = "
        f"{flops['LM (CE only)']:.3g}.", "",
        "| task | implementation | step (ms) | tokens/s | achieved GFLOP/s | first-step "
        "loss |", "|---|---|---|---|---|---|"]
    for key, task, name in ROWS:
        sec = times[key]
        lines.append(f"| {task} | {name} | {sec * 1e3:,.1f} | {tokens / sec:,.0f} | "
                     f"{flops[task] * tokens / sec / 1e9:.2f} | {first[key]:.5f} |")
    lines += ["", "Ratios (torch step time ÷ kdjax step time, same run; above 1: kdjax is "
              "faster):", ""]
    for num, den, what in RATIOS:
        lines.append(f"- **{times[num] / times[den]:.2f}×**: {what}.")
    lines += ["", "Compiled memory of the kdjax steps (arguments + outputs + temporaries − "
              f"aliased): distillation {(kd['kd'][1] or 0) / 2**20:.1f} MiB, LM "
              f"{(kd['lm'][1] or 0) / 2**20:.1f} MiB.", ""]
    bc.write("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(bc.main(build_parser, run))
