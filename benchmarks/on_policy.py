"""On-policy distillation step: kdjax vs TRL's `GKDTrainer`, and where kdjax's step goes.

One tiny Llama student and teacher (transformers `LlamaConfig`, random weights, saved
with `save_pretrained`; kdjax loads the same directories with
`kdjax.models.from_pretrained`), one batch of prompts of exactly P tokens, C new tokens
per row at most (both stop a row at eos, id 2, the tokenizer's and both configs'; random
weights sample it about once in V tokens, and both loops run until every row ended or C
tokens), float32:

  kdjax   the jitted `train_step` with `OnPolicyObjective(loss="gkd", fraction=1)`:
          the rollout (`kdjax.models.rollout`, KV cache, `lax.while_loop`) from the
          current student parameters, the layout, the online teacher and the student
          forward, the generalized JSD (β = 0.5) through the fused kernel, backward,
          clipping and AdamW, all in one compiled program;
  TRL     `trl.experimental.gkd.GKDTrainer` itself, `lmbda=1` (every step samples),
          `beta=0.5`, `temperature=1`, `max_new_tokens=C`, driven by `Trainer.train()`:
          `model.generate` (sampling, KV cache), the teacher forward under no_grad, the
          student forward, `generalized_jsd_loss` on full `[B, L, V]` logits, backward,
          clipping, AdamW. Its step is timed from `on_step_begin` to `on_step_end` (the
          callbacks around training_step + clip + optimizer + scheduler); its generate and
          teacher forward are timed by wrappers inside that same step.

The kdjax split is measured in the same run: the jitted rollout alone (same shapes and
sampling), the jitted teacher forward alone (trunk + LM head on the [B, P + C] rows) and
the full step; "update" is the rest (student forward and backward, loss, optimizer).
kdjax's calls run inside the TRL loop's `on_step_end` (outside TRL's timed interval),
so the two alternate step by step and a change in load hits both. Medians after warm-up.

    python benchmarks/on_policy.py           # results/on_policy.md (~3 min on 2 cores)
    python benchmarks/on_policy.py --quick   # smoke (seconds)
    python benchmarks/on_policy.py --single-thread --append   # one core each, same file
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc

EOS = 2  # the eos id of kdjax's BPE tokenizers (and so of both configs)
SIZES = {  # student and teacher LlamaConfig dims, vocabulary
    "full": dict(student=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2),
                 teacher=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=4),
                 vocab=4096),
    "quick": dict(student=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2),
                  teacher=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2),
                  vocab=512),
}


def build_parser(parser=None):
    p = bc.new_parser(__doc__, parser)
    p.add_argument("--quick", action="store_true", help="tiny models, short sequences")
    p.add_argument("--batch", type=int, default=8, help="prompts per step")
    p.add_argument("--prompt-len", type=int, default=32, help="P, tokens per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="C, tokens sampled per row")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 8; 3 "
                   "with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--single-thread", action="store_true",
                   help="pin the process to one core: one thread for XLA and torch")
    p.add_argument("--out", default=str(bc.RESULTS / "on_policy.md"))
    p.add_argument("--append", action="store_true",
                   help="add this run's section to --out instead of replacing the file")
    return p


def save_models(root: Path, size: dict, length: int) -> tuple[Path, Path]:
    """Random-weight Llama student and teacher (+ a tokenizer that TRL's trainer loads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdjax.models import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["the quick brown fox jumps over the lazy dog"] * 4, 300,
                              root / "tok")
    dirs = []
    for i, name in enumerate(("student", "teacher")):
        torch.manual_seed(i)
        cfg = LlamaConfig(vocab_size=size["vocab"], max_position_embeddings=length,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS,
                          pad_token_id=0, **size[name])
        LlamaForCausalLM(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(root / name)
    return dirs[0], dirs[1]


def kdjax_fns(s_dir, t_dir, prompts, width: int):
    """`{"step", "rollout", "teacher"}`: blocking callables (the step returns its loss),
    and the step's compile seconds."""
    import jax
    import jax.numpy as jnp

    from kdjax import sharding as shd
    from kdjax.models import from_pretrained
    from kdjax.models.rollout import rollout
    from kdjax.train.config import OptimizerConfig
    from kdjax.train.layout import completion_layout
    from kdjax.train.objective import Objective
    from kdjax.train.on_policy import OnPolicyObjective
    from kdjax.train.state import create_train_state, split_model
    from kdjax.train.step import make_train_step

    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    load = dict(dtype="float32", param_dtype="float32")
    teacher = split_model(from_pretrained(t_dir, **load))
    student = from_pretrained(s_dir, **load)
    # TRL's defaults: AdamW, no weight decay, grad-norm clip 1.0, linear decay (constant here)
    tx = OptimizerConfig(lr=1e-4, warmup_steps=0, weight_decay=0.0, clip_norm=1.0,
                         decay="constant").build(10_000)
    state = create_train_state(student, tx, mesh=mesh, seed=0)
    obj = OnPolicyObjective(
        base=Objective(divergence="jsd", divergence_kwargs=(("beta", 0.5),),
                       teacher_source="online"),
        loss="gkd", fraction=1.0, max_new_tokens=width, temperature=1.0, stop_ids=(EOS,),
        pad_id=0)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    b, p = prompts.shape
    batch = jax.device_put({"prompt": prompts, "prompt_len": jnp.full((b,), p, jnp.int32),
                            "example_id": jnp.arange(b, dtype=jnp.uint32)}, sharding)
    step = make_train_step(obj, tx, state=state, mesh=mesh, batch_sharding=sharding,
                           teacher=teacher)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        step.jitted.lower(state, batch, teacher[1:]).compile()
    compile_s = time.perf_counter() - t0
    box = [state]

    def full_step():
        with jax.set_mesh(mesh):
            box[0], m = step(box[0], batch)
            return float(m["loss"].sum) / float(m["loss"].count)

    @jax.jit
    def sample(params, keys):
        return rollout((box[0].graphdef, params, box[0].rest), batch["prompt"],
                       batch["prompt_len"], keys, max_new_tokens=width, temperature=1.0,
                       stop_ids=(EOS,), pad_id=0).tokens

    keys = jax.random.split(jax.random.key(0), b)
    laid = completion_layout(batch["prompt"], batch["prompt_len"],
                             jnp.ones((b, width), jnp.int32), jnp.full((b,), width), 0)

    @jax.jit
    def teacher_forward(t_params, t_rest):
        from flax import nnx

        model = nnx.merge(teacher[0], t_params, *(x for x in [t_rest] if x is not None))
        return model(laid["tokens"], segment_ids=laid["segment_ids"],
                     positions=laid["positions"]).logits

    fns = {"step": full_step,
           "rollout": lambda: jax.block_until_ready(sample(box[0].params["model"], keys)),
           "teacher": lambda: jax.block_until_ready(teacher_forward(teacher[1], teacher[2]))}
    return fns, compile_s


def trl_trainer(s_dir, t_dir, prompts, width: int, steps: int, tmp: Path):
    """TRL's GKDTrainer on `steps` copies of the batch (a collator that hands it over
    as-is), with timers around its generate and teacher forward."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.set_num_threads(bc.threads())
    b, p = prompts.shape
    ids = torch.tensor(np.asarray(prompts), dtype=torch.long)
    # input_ids/labels as a dataset row would have them (lmbda = 1 replaces them)
    full = torch.cat([ids, torch.ones((b, width), dtype=torch.long)], 1)
    labels = full.clone()
    labels[:, :p] = -100

    def collate(rows):
        return {"prompts": ids, "prompt_attention_mask": torch.ones_like(ids),
                "input_ids": full, "attention_mask": torch.ones_like(full), "labels": labels}

    args = GKDConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=b,
                     max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant",
                     lmbda=1.0, beta=0.5, temperature=1.0, max_new_tokens=width,
                     logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
                     dataloader_num_workers=0, seed=0, max_length=None)
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(t_dir, dtype=torch.float32),
        args=args, data_collator=collate,
        train_dataset=Dataset.from_dict({"row": list(range(b * steps))}),
        processing_class=AutoTokenizer.from_pretrained(s_dir))
    parts = {"generate": [], "teacher": []}

    def timer(fn, name):
        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            parts[name].append(time.perf_counter() - t0)
            return out
        return wrapped

    trainer.generate_on_policy_outputs = timer(trainer.generate_on_policy_outputs, "generate")
    trainer.teacher_model.forward = timer(trainer.teacher_model.forward, "teacher")
    return trainer, parts


def run(args, argv) -> int:
    if args.single_thread:
        bc.single_thread()
    import jax
    import numpy as np
    from transformers import TrainerCallback

    size = SIZES["quick" if args.quick else "full"]
    b, p, c = args.batch, args.prompt_len, args.max_new_tokens
    if args.quick:
        p, c = min(p, 8), min(c, 8)
    repeats = args.repeats or (3 if args.quick else 8)
    steps = args.warmup + repeats
    prompts = np.random.default_rng(0).integers(1, size["vocab"], (b, p)).astype(np.int32)
    times = {k: [] for k in ("trl", "kdjax", "rollout", "teacher")}
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        s_dir, t_dir = save_models(Path(tmp), size, p + c)
        fns, compile_s = kdjax_fns(s_dir, t_dir, prompts, c)
        trainer, parts = trl_trainer(s_dir, t_dir, prompts, c, steps, Path(tmp))

        class Interleave(TrainerCallback):
            """Times TRL's step; runs one kdjax step, rollout and teacher forward after it."""

            def on_step_begin(self, *a, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, *a, **kw):
                times["trl"].append(time.perf_counter() - self.t0)
                for key, name in (("kdjax", "step"), ("rollout", "rollout"),
                                  ("teacher", "teacher")):
                    t0 = time.perf_counter()
                    out = fns[name]()
                    times[key].append(time.perf_counter() - t0)
                    if name == "step":
                        losses.setdefault("kdjax", out)

        trainer.add_callback(Interleave())
        trainer.train()
    med = {k: statistics.median(v[args.warmup:]) for k, v in times.items()}
    med["trl_generate"] = statistics.median(parts["generate"][args.warmup:])
    med["trl_teacher"] = statistics.median(parts["teacher"][args.warmup:])
    text = report(med, size, args, argv, b, p, c, repeats, compile_s,
                  jax.devices()[0].device_kind)
    if args.append and Path(args.out).exists():
        text = Path(args.out).read_text().rstrip() + "\n\n" + text
    bc.write(text, args.out)
    return 0


def report(med, size, args, argv, b, p, c, repeats, compile_s, device) -> str:
    tokens = b * c  # sampled completion tokens per step
    ratio = med["trl"] / med["kdjax"]

    def row(name, total, rollout, teacher):
        rest = total - rollout - teacher
        return (f"| {name} | {total * 1e3:,.1f} | {tokens / total:,.0f} | "
                f"{rollout * 1e3:,.1f} ({rollout / total:.0%}) | {tokens / rollout:,.0f} | "
                f"{teacher * 1e3:,.1f} ({teacher / total:.0%}) | "
                f"{rest * 1e3:,.1f} ({rest / total:.0%}) |")

    return "\n".join([
        f"## On-policy distillation step: kdjax vs TRL GKDTrainer ({bc.threads()} "
        "thread(s) each)", "",
        f"Command: `{bc.command('on_policy.py', argv)}`", "",
        f"{bc.machine(torch_version=True)}, trl {_trl_version()}; device {device}; torch "
        f"threads {bc.threads()}. float32. Student {size['student']}, teacher "
        f"{size['teacher']} (transformers LlamaConfig, random weights, the same "
        f"directories for both), vocab {size['vocab']}; batch {b}, prompts of {p} tokens, "
        f"up to {c} sampled tokens per row (eos = id 2 ends a row), temperature 1, "
        f"GKD λ = 1, generalized JSD β = 0.5, AdamW lr 1e-4, clip 1.0. Median of {repeats} "
        f"steps after {args.warmup} warm-up steps, kdjax and TRL alternating step by step. "
        f"kdjax compile of the step: {compile_s:.1f} s (not in the step time).", "",
        "| implementation | step (ms) | sampled tokens/s | rollout / generate (ms) | "
        "rollout tokens/s | teacher forward (ms) | rest: student fwd+bwd, loss, "
        "optimizer (ms) |", "|---|---:|---:|---:|---:|---:|---:|",
        row("kdjax (jitted step; split: rollout and teacher timed alone)", med["kdjax"],
            med["rollout"], med["teacher"]),
        row("TRL GKDTrainer (split: timed inside its step)", med["trl"],
            med["trl_generate"], med["trl_teacher"]), "",
        f"**kdjax on-policy step {ratio:.2f}× faster than TRL's GKDTrainer** (TRL step ÷ "
        f"kdjax step, same run); rollout alone {med['trl_generate'] / med['rollout']:.2f}× "
        f"TRL's `model.generate`. Target (issue 16): ≥ 3× → "
        f"{'met' if ratio >= 3 else 'not met'} in this run.", ""])


def _trl_version() -> str:
    import trl

    return trl.__version__


if __name__ == "__main__":
    sys.exit(bc.main(build_parser, run))
