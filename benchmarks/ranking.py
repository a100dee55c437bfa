"""DPO training step: kdjax's `ranking` objective vs TRL's DPOTrainer, one run.

Every row trains the same policy (same weights, loaded from one Hugging Face directory)
with DPO (β = 0.1, sigmoid loss) against the same frozen reference (other weights), on
the same batch: B prompts of P tokens, each with a chosen and a rejected completion of C
tokens (2·B sequences of P + C tokens, no padding), in float32, with global-norm clipping
(1.0) and AdamW (lr 1e-4, betas 0.9/0.95, weight decay 0.01), each row with its own copy
of the policy and optimizer:

  kdjax, online reference   the jitted `kdjax.train.step.make_train_step` with
                            `RankingObjective("dpo", reference="online")`: policy and
                            reference forwards in the step, fused sequence log-probs;
  kdjax, stored reference   the same with `reference="stored"` (the reference log-probs
                            precomputed once, in the batch): no reference forward;
  TRL, online reference     TRL's DPOTrainer as its training loop runs a step:
                            `trainer.training_step(model, batch)` (DPO compute_loss with
                            the reference forward under no_grad, and backward), then
                            `accelerator.clip_grad_norm_`, `optimizer.step()` (the
                            trainer's own AdamW from `create_optimizer`) and `zero_grad`;
  TRL, stored reference     the same trainer code with `precompute_ref_logps` on and the
                            batch's `ref_chosen_logps` / `ref_rejected_logps` computed
                            once by `trainer.compute_ref_log_probs`;
  kdjax LM step             the jitted train step of the distillation `Objective` with
                            α = 1 (fused CE on the completion tokens) on the same 2·B
                            sequences: what a policy step costs without DPO (its lm_head
                            sweeps take 6·N·H·V FLOPs, the sequence log-probs' 8·N·H·V).

TRL's DPOConfig defaults to bf16=True, which on CPU runs the forwards under bf16 autocast;
here bf16=False, so both sides compute in float32 (their first-step losses then agree).
The rows are timed interleaved (one step of each in turn), medians after warm-up steps;
the first step's loss is printed per row (same weights and batch: the rows agree). torch
runs with `torch.set_num_threads` = the cores this process may use (`--single-thread`:
one core for both). Tokens/s counts every token of the 2·B sequences.

    python benchmarks/ranking.py --single-thread   # one core each (results/ranking.md)
    python benchmarks/ranking.py --quick           # smoke (seconds)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc

SIZES = {
    "full": dict(model=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=8),
                 vocab=8192, batch=8, prompt=64, completion=64),
    "quick": dict(model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4),
                  vocab=512, batch=4, prompt=16, completion=16),
}
BETA, LR = 0.1, 1e-4
ROWS = [("kdjax_online", "kdjax, online reference (jit train step)"),
        ("trl_online", "TRL DPOTrainer, online reference (training_step + AdamW)"),
        ("kdjax_stored", "kdjax, stored reference (precomputed log-probs)"),
        ("trl_stored", "TRL DPOTrainer, precomputed reference log-probs"),
        ("kdjax_lm", "kdjax LM step on the same sequences (fused CE, no DPO): a floor")]


def build_parser(parser=None):
    p = bc.new_parser(__doc__, parser)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per row (median; "
                   "default 5, 3 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    p.add_argument("--single-thread", action="store_true",
                   help="pin the process to one core: one thread for both XLA and torch")
    p.add_argument("--out", default=str(bc.RESULTS / "ranking.md"))
    return p


def _rows(size, rng):
    """The preference rows (K = 2: chosen first, scored higher)."""
    import numpy as np

    b, p, c, v = size["batch"], size["prompt"], size["completion"], size["vocab"]
    return {"prompt": rng.integers(3, v, (b, p)).astype(np.int32),
            "prompt_len": np.full((b,), p, np.int32),
            "candidates": rng.integers(3, v, (b, 2, c)).astype(np.int32),
            "candidate_len": np.full((b, 2), c, np.int32),
            "scores": np.tile(np.array([1.0, 0.0], np.float32), (b, 1)),
            "valid": np.ones((b, 2), bool)}


def kdjax_steps(policy_dir, ref_dir, rows):
    """{"kdjax_online", "kdjax_stored"}: blocking callables returning the step's loss."""
    import jax

    from kdjax import sharding as shd
    from kdjax.models import from_pretrained
    from kdjax.train.config import OptimizerConfig
    from kdjax.train.objective import Objective
    from kdjax.train.ranking import RankingObjective, candidate_sequences, reference_logps
    from kdjax.train.state import create_train_state, split_model
    from kdjax.train.step import make_train_step

    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ref = split_model(from_pretrained(ref_dir, dtype="float32", param_dtype="float32"))
    tx = OptimizerConfig(lr=LR, decay="constant", weight_decay=0.01, clip_norm=1.0).build(
        total_steps=10_000)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch = jax.device_put(rows, sharding)
    stored = dict(batch, ref_logps=jax.jit(
        lambda p, r, b: reference_logps(ref[0], p, r, b))(ref[1], ref[2], batch))
    # the same 2·B sequences as a plain LM batch (CE on the completions): the floor
    idx = jax.numpy.broadcast_to(jax.numpy.arange(2), rows["scores"].shape)
    lm = jax.device_put(candidate_sequences(batch, idx, 0), sharding)
    out = {}
    for name, obj, t, b in (
            ("kdjax_online", RankingObjective("dpo", beta=BETA, reference="online"), ref, batch),
            ("kdjax_stored", RankingObjective("dpo", beta=BETA), None, stored),
            ("kdjax_lm", Objective(alpha=1.0, teacher_source="none"), None, lm)):
        state = create_train_state(from_pretrained(policy_dir, dtype="float32",
                                                   param_dtype="float32"), tx, mesh=mesh, seed=0)
        step = make_train_step(obj, tx, state=state, mesh=mesh, batch_sharding=sharding,
                               teacher=t)
        box = [state]

        def one(step=step, box=box, b=b):
            with jax.set_mesh(mesh):
                box[0], m = step(box[0], b)
                return float(m["loss"].sum) / float(m["loss"].count)

        out[name] = one
    return out


def trl_steps(policy_dir, ref_dir, rows, tmp):
    """{"trl_online", "trl_stored"}: blocking callables returning the step's loss."""
    import torch
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(bc.threads())
    vocab = {f"t{i}": i for i in range(rows["candidates"].max() + 1)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "t0")),
                                  pad_token="t0", eos_token="t2")
    # the trainer needs a text dataset to start; the timed batch is built from our rows
    ds = Dataset.from_dict({"prompt": ["t5"], "chosen": [" t6"], "rejected": [" t7"]})
    examples = [{"prompt_ids": rows["prompt"][b].tolist(),
                 "chosen_ids": rows["candidates"][b, 0].tolist(),
                 "rejected_ids": rows["candidates"][b, 1].tolist()}
                for b in range(len(rows["prompt"]))]
    out = {}
    for name, stored in (("trl_online", False), ("trl_stored", True)):
        args = trl.DPOConfig(output_dir=str(Path(tmp) / name), use_cpu=True, report_to="none",
                             beta=BETA, learning_rate=LR, weight_decay=0.01, adam_beta2=0.95,
                             max_grad_norm=1.0, bf16=False, save_strategy="no",
                             disable_tqdm=True)
        model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
        trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds,
                                 processing_class=tok)
        trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
        trainer.current_gradient_accumulation_steps = 1  # what its train loop sets
        batch = trainer.data_collator(examples)
        if stored:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = (
                trainer.compute_ref_log_probs(ref, batch))
            trainer.precompute_ref_logps = True

        def one(trainer=trainer, model=model, batch=batch):
            loss = trainer.training_step(model, batch)
            trainer.accelerator.clip_grad_norm_(model.parameters(), 1.0)
            trainer.optimizer.step()
            model.zero_grad(set_to_none=True)
            return float(loss)

        out[name] = one
    return out


def run(args, argv) -> int:
    if args.single_thread:
        bc.single_thread()
    import jax
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    size = SIZES["quick" if args.quick else "full"]
    repeats = args.repeats or (3 if args.quick else 5)
    rows = _rows(size, np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for seed in (0, 1):  # policy, reference
            torch.manual_seed(seed)
            cfg = LlamaConfig(vocab_size=size["vocab"], max_position_embeddings=512,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0,
                              tie_word_embeddings=False, **size["model"])
            dirs.append(Path(tmp) / f"m{seed}")
            LlamaForCausalLM(cfg).save_pretrained(dirs[-1])
        fns = {**kdjax_steps(*dirs, rows), **trl_steps(*dirs, rows, tmp)}
        first = {}

        def first_loss(key):
            def call():
                first.setdefault(key, fns[key]())
            return call

        keys = [k for k, _ in ROWS]
        times = dict(zip(keys, bc.timed_interleaved([first_loss(k) for k in keys], repeats,
                                                    warmup=args.warmup)))
    b, p, c = size["batch"], size["prompt"], size["completion"]
    tokens = 2 * b * (p + c)
    lines = [
        f"## DPO step: kdjax vs TRL DPOTrainer ({bc.threads()} thread(s) each)", "",
        f"Command: `{bc.command('ranking.py', argv)}`", "",
        f"{bc.machine(torch_version=True)}, trl {_trl_version()}; device "
        f"{jax.devices()[0].device_kind}; torch threads {bc.threads()}. float32 Llama "
        f"{size['model']}, vocab {size['vocab']}; batch {b} prompts × (chosen, rejected), "
        f"prompt {p} + completion {c} tokens = {tokens} tokens per step; DPO β = {BETA}, "
        f"AdamW lr {LR}, clip 1.0. Median of {repeats} steps per row after {args.warmup} "
        "warm-up steps, rows interleaved. What each row times: the docstring of "
        "`benchmarks/ranking.py`.", "",
        "| implementation | step (ms) | tokens/s | first-step loss |", "|---|---|---|---|"]
    for key, name in ROWS:
        lines.append(f"| {name} | {times[key] * 1e3:,.1f} | {tokens / times[key]:,.0f} | "
                     f"{first[key]:.5f} |")
    floor = times["kdjax_stored"] / times["kdjax_lm"]
    lines += ["", "Ratios (TRL step time ÷ kdjax step time, same run; above 1: kdjax is "
              "faster):", "",
              f"- **{times['trl_online'] / times['kdjax_online']:.2f}×** with the reference "
              "forward in the step (TRL's default, like for like);",
              f"- **{times['trl_stored'] / times['kdjax_stored']:.2f}×** with precomputed "
              "reference log-probs on both sides;",
              f"- **{times['trl_online'] / times['kdjax_stored']:.2f}×** kdjax's stored "
              "reference vs TRL's default step.", "",
              f"kdjax's stored-reference DPO step takes {floor:.2f}× its LM step on the "
              "same tokens.", ""]
    bc.write("\n".join(lines), args.out)
    return 0


def _trl_version() -> str:
    import trl

    return trl.__version__


if __name__ == "__main__":
    sys.exit(bc.main(build_parser, run))
