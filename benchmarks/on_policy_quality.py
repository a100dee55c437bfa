"""On-policy distillation on the quickstart's grammar: does sampling from the student help?

One teacher (the quickstart's: trained on 4,000 grammar documents) and, per seed, one
student initialisation trained for the same steps by each arm:

  hard-label     next-token CE on the student corpus (120 documents, packed rows; the
                 quickstart's baseline)
  sampled-KD     forward KL to the teacher's sampled store on the same rows (the
                 quickstart's distilled student: off-policy)
  gkd λ=0        JSD(β = 0.5) to the online teacher on the dataset completions of the
                 sentence examples below (offline KD, the same examples as the
                 on-policy arms: separates "sentence examples" from "on-policy")
  gkd λ=0.5      the same, each completion sampled from the current student with
                 probability 0.5
  gkd λ=1        every completion sampled from the student (GKD, Agarwal et al. 2024)
  rkl_reward     policy gradient on r_t = log p(y_t) − log q_old(y_t) (γ = 0): on-policy
                 reverse KL
  minillm        MiniLLM (Gu et al. 2024): teacher-mixed sampling (α = 0.2), length-
                 normalised long-term rewards (γ = 1), PPO clip 0.2, + the single-step
                 reverse KL

A second table starts the on-policy arms where the GKD and MiniLLM papers start them,
from a student that already imitates the data: each seed's student after --warm-steps
(200) steps of gkd λ=0 continues for the remaining steps under gkd λ=0 (the control),
λ=0.5, λ=1, rkl_reward and minillm.

Sentence examples: every sentence of the student corpus's 120 training documents is
split after its first 1–3 words (drawn per sentence): prompt = those words, completion =
the rest of the sentence up to its " ." (which ends a sampled completion). Their
tokenizer is the quickstart's with a plain-concatenation chat template, so a prompt and
completion are tokenized exactly as inside a document (the grammar has no chat format).

Metrics, per arm and seed (and for the teacher itself):
  CE docs      held-out CE on the quickstart's 300 held-out documents (the same token
               store for every arm; it also scores tokens the sentence arms never train
               on: each sentence's first words and what links sentences in a document);
  CE compl     held-out CE on the completions of the held-out documents' sentence
               examples (the tokens the on-policy arms are trained on);
  KL(q‖p)      exact per-token KL(student ‖ teacher) on the student's own samples
               (temperature 1) from the held-out prompts, mean per completion token;
  log p        the teacher's mean log-prob per token of those samples;
  accepted     the fraction of those free-running samples that end with " ." within
               the token budget and that `kdjax.quickstart.Grammar.accepts` (prompt +
               completion is a sentence the grammar generates);
  ms/step      median step time of the arm's training (one process, the whole CPU).

    python benchmarks/on_policy_quality.py            # ≈ 30 min on 2 shared CPU cores
    python benchmarks/on_policy_quality.py --quick    # smoke run (numbers mean nothing)
    python benchmarks/on_policy_quality.py --prepare-only   # inputs of configs/on_policy

Outputs in --out (default runs/on_policy): the data, teacher and stores are built once
and reused (configs/on_policy/*.yaml train on them); the runs in OUT/runs are trained
afresh by every invocation. The tables go to benchmarks/results/on_policy_quality.md.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc

ARMS = {  # arm -> the name of its run directory
    "hard-label": "hard_label", "sampled-KD": "sampled_kd", "gkd λ=0": "gkd_l0",
    "gkd λ=0.5": "gkd_l05", "gkd λ=1": "gkd_l1", "rkl_reward": "rkl_reward",
    "minillm": "minillm"}
ON_POLICY = {  # arm -> objective.on_policy (+ the divergence, for gkd)
    "gkd λ=0": dict(loss="gkd", fraction=0.0),
    "gkd λ=0.5": dict(loss="gkd", fraction=0.5),
    "gkd λ=1": dict(loss="gkd", fraction=1.0),
    "rkl_reward": dict(loss="rkl_reward", fraction=1.0),
    "minillm": dict(loss="minillm", fraction=1.0, source="mixed", mix_alpha=0.2),
}
WARM_ARMS = ("gkd λ=0", "gkd λ=0.5", "gkd λ=1", "rkl_reward", "minillm")
PLAIN_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %} {% endif %}"
                  "{{ m['content'] }}{% endfor %}")
PROMPT_LEN, COMPLETION_LEN = 8, 16


def build_parser(parser=None):
    p = bc.new_parser(__doc__, parser)
    p.add_argument("--out", default="runs/on_policy", help="data, teacher and runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="student seeds")
    p.add_argument("--steps", type=int, default=None, help="steps per arm (default 400)")
    p.add_argument("--example-batch", type=int, default=64,
                   help="sentence examples per step of the example arms (packed arms: 16 "
                   "rows of 64 tokens, as the quickstart)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="rollout width")
    p.add_argument("--samples", type=int, default=512, help="held-out prompts sampled")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--warm-steps", type=int, default=200, help="the warm-start table: this "
                   "many steps of gkd λ=0, then the rest of --steps under each on-policy "
                   "arm (0: no warm-start table)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few steps")
    p.add_argument("--prepare-only", action="store_true", help="build the inputs that "
                   "configs/on_policy/*.yaml train on (data, teacher, stores), then stop")
    p.add_argument("--results", default=str(bc.RESULTS / "on_policy_quality.md"))
    return p


def paths(out: Path) -> dict[str, str]:
    """Where the shared inputs live under `out` (what configs/on_policy/*.yaml name)."""
    return {"tokenizer": str(out / "tokenizer"), "plain_tokenizer": str(out / "tokenizer_plain"),
            "teacher_train": str(out / "tokens_teacher" / "train"),
            "train": str(out / "tokens" / "train"), "eval": str(out / "tokens" / "eval"),
            "teacher": str(out / "teacher" / "hf"), "store": str(out / "teacher_store"),
            "examples": str(out / "examples" / "train"),
            "heldout_examples": str(out / "examples_heldout" / "train")}


def arm_config(arm: str, seed: int, out: Path, size: dict, *, steps: int, vocab: int,
               stop_ids: list[int], example_batch: int = 64, max_new_tokens: int = 16) -> dict:
    """The `kdjax train` config (as a dict) of one arm."""
    from kdjax.quickstart import _model_init

    p = paths(out)
    example = arm in ON_POLICY
    cfg = {"run_dir": str(out / "runs" / f"{ARMS[arm]}_s{seed}"), "steps": steps,
           "global_batch_size": example_batch if example else size["student_batch"],
           "seed": seed,
           "model": {"init": _model_init(vocab, size["student"], size["seq_len"]),
                     "dtype": "float32"},
           "data": {"train": p["examples"] if example else p["train"],
                    "eval": p["heldout_examples"] if example else p["eval"],
                    "tokenizer": p["plain_tokenizer"] if example else p["tokenizer"]},
           "objective": {"alpha": 1.0 if arm == "hard-label" else 0.0, "temperature": 1.0,
                         "t2_scaling": False},
           "optimizer": {"lr": 3e-3, "warmup_steps": max(1, steps // 20),
                         "weight_decay": 0.01, "min_lr_ratio": 0.1},
           "mesh": {"data": -1},
           "checkpoint": {"every": 0, "keep": 1, "async_save": False},
           "eval": {"every": 0, "batches": 2},
           "logging": {"every": max(1, steps // 10), "tensorboard": False, "plot": False,
                       "progress": False}}
    if arm == "sampled-KD":
        cfg["store"] = {"path": p["store"]}
    if example:
        cfg["teacher"] = {"path": p["teacher"], "dtype": "float32"}
        if ON_POLICY[arm]["loss"] == "gkd":
            cfg["objective"].update(divergence="jsd", divergence_kwargs={"beta": 0.5})
        cfg["objective"]["on_policy"] = dict(ON_POLICY[arm], max_new_tokens=max_new_tokens,
                                             temperature=1.0, stop_ids=list(stop_ids))
    return cfg


# ----------------------------------------------------------------------- shared inputs


def prepare(out: Path, size: dict, progress: bool) -> dict:
    """Corpus, tokenizers, token stores, teacher, sampled store and sentence examples
    (each built once; an existing one is reused)."""
    from kdjax import quickstart as qs
    from kdjax.models import load_tokenizer, save_pretrained
    from kdjax.train.loop import train

    p = paths(out)
    if not Path(p["eval"]).exists():
        qs.make_data(out, size, seed=0, progress=progress)
    vocab = len(load_tokenizer(p["tokenizer"]))
    if not (Path(p["teacher"]) / "config.json").exists():
        t0 = time.perf_counter()
        t = train(qs.train_config(out, "teacher", size=size, seed=0, vocab=vocab,
                                  data=p["teacher_train"], eval_data=p["eval"],
                                  steps=size["teacher_steps"], batch=size["teacher_batch"],
                                  dims=size["teacher"], lr=3e-3, progress=progress))
        save_pretrained(t["state"].model(), p["teacher"])
        print(f"teacher: {time.perf_counter() - t0:.0f} s", flush=True)
    if not (Path(p["store"]) / "manifest.json").exists():
        qs.precompute_signal(out, p["teacher"], p["train"], size, 0, progress,
                             tokenizer=p["tokenizer"])
    if not Path(p["heldout_examples"]).exists():
        write_examples(out, size, p)
    tok = load_tokenizer(p["tokenizer"])
    dot = tok(" .", add_special_tokens=False)["input_ids"]
    if len(dot) != 1:
        raise ValueError(f"' .' must be one token of the quickstart tokenizer, got {dot}")
    return {"vocab": vocab, "stop_ids": [dot[0], tok.eos_token_id], "dot": dot[0],
            "pad": tok.pad_token_id or 0}


def write_examples(out: Path, size: dict, p: dict) -> None:
    """Sentence examples of the student corpus's training / held-out documents (the
    documents `make_data` put in tokens/train and tokens/eval)."""
    import numpy as np

    from kdjax.data.build import split_indices
    from kdjax.data.examples import build_example_store
    from kdjax.models import load_tokenizer

    tok = load_tokenizer(p["tokenizer"])
    tok.chat_template = PLAIN_TEMPLATE
    tok.save_pretrained(p["plain_tokenizer"])
    lines = (out / "corpus" / "student.jsonl").read_text().splitlines()
    docs = [json.loads(line)["text"] for line in lines]
    splits, _ = split_indices(len(docs), 0.0, size["eval_docs"], 0, "documents")
    rng = np.random.default_rng(0)
    for split, name in (("train", "examples"), ("eval", "examples_heldout")):
        rows = []
        for i in splits[split]:
            for sentence in docs[i].replace(" . ", " .\n").split("\n"):
                words = sentence.split(" ")
                cut = int(rng.integers(1, 4))
                rows.append({"prompt": " ".join(words[:cut]),
                             "response": " ".join(words[cut:])})
        src = out / "corpus" / f"{name}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        build_example_store(str(src), p["plain_tokenizer"], out / name, prompt_len=PROMPT_LEN,
                            completion_len=COMPLETION_LEN, prompt_field="prompt",
                            response_field="response", overwrite=True, progress=False)


# ----------------------------------------------------------------------- metrics


def heldout_ce(model, teacher, store, batch: int) -> dict:
    """CE (and KL to the teacher) over all full batches of a token / laid-out store."""
    import jax

    from kdjax import sharding as shd
    from kdjax.data import Loader
    from kdjax.train import evaluate as ev
    from kdjax.train.state import split_model

    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, params, rest = split_model(model)
    loader = Loader(store, global_batch_size=batch, seed=0, mesh=mesh, shuffle=False)
    fn = ev.make_eval_fn(graphdef, mesh, teacher=split_model(teacher))
    with jax.set_mesh(mesh):
        return ev.evaluate(fn, params, rest, (loader.batch_at(i)
                                              for i in range(max(1, store.num_rows // batch))))


def sample_metrics(model, teacher, prompts: dict, info: dict, seed: int, width: int,
                   tokenizer, grammar) -> dict:
    """Free-running samples of `model` from held-out prompts: the grammar's acceptance
    rate, exact KL(model ‖ teacher) per completion token, the teacher's log-prob."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kdjax.losses import reverse_kl
    from kdjax.models import example_keys, generate
    from kdjax.train.layout import completion_layout, completion_mask, to_completion

    out = generate(model, prompts["prompt"], prompt_lengths=prompts["prompt_len"],
                   max_new_tokens=width, temperature=1.0, eos_token_id=[info["stop_ids"][1]],
                   stop_token_ids=[info["dot"]], pad_token_id=info["pad"],
                   seeds=example_keys(seed, prompts["example_id"]))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    laid = completion_layout(jnp.asarray(prompts["prompt"]), jnp.asarray(prompts["prompt_len"]),
                             jnp.asarray(tokens), jnp.asarray(lengths), info["pad"])

    @jax.jit
    def score(laid):
        kw = dict(segment_ids=laid["segment_ids"], positions=laid["positions"])
        s, t = model(laid["tokens"], **kw).logits, teacher(laid["tokens"], **kw).logits
        kl = to_completion(reverse_kl(s, t), prompts_len, width)
        logp = jax.nn.log_softmax(t.astype(jnp.float32), -1)
        logp = jnp.take_along_axis(logp, laid["targets"][..., None], -1)[..., 0]
        return kl, to_completion(logp, prompts_len, width)

    prompts_len = jnp.asarray(prompts["prompt_len"])
    kl, logp = (np.asarray(x, np.float64) for x in score(laid))
    mask = np.asarray(completion_mask(jnp.asarray(lengths), width))
    finished = np.asarray(out.finish_reason) == 2  # ended with " ."
    accepted = [bool(f) and grammar.accepts(tokenizer.decode(
        np.concatenate([prompts["prompt"][i, :prompts["prompt_len"][i]], tokens[i, :n]])))
        for i, (f, n) in enumerate(zip(finished, lengths))]
    return {"kl_samples": float(kl[mask].mean()), "teacher_logp": float(logp[mask].mean()),
            "accepted": float(np.mean(accepted)), "finished": float(finished.mean()),
            "sample_len": float(lengths.mean())}


# ----------------------------------------------------------------------- the experiment


def run_arm(arm, seed, out, size, info, args, steps, *, init_path=None, prefix=""):
    """Trains one arm; returns (the student Decoder, median step seconds)."""
    from kdjax.train.config import config_from_dict
    from kdjax.train.loop import train

    cfg = arm_config(arm, seed, out, size, steps=steps, vocab=info["vocab"],
                     stop_ids=info["stop_ids"], example_batch=args.example_batch,
                     max_new_tokens=args.max_new_tokens)
    if init_path is not None:  # continue from a saved student (fresh optimizer and schedule)
        cfg["model"] = {"path": init_path, "dtype": "float32"}
    cfg["run_dir"] = str(Path(cfg["run_dir"]).with_name(prefix + Path(cfg["run_dir"]).name))
    shutil.rmtree(cfg["run_dir"], ignore_errors=True)  # every invocation trains afresh
    stamps = []
    summary = train(config_from_dict(cfg), hooks=[lambda step, state, metrics: stamps.append(
        time.perf_counter())])
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # step 1 compiles
    return summary["state"].model(), statistics.median(gaps)


def run(args, argv) -> int:
    import numpy as np

    from kdjax import quickstart as qs
    from kdjax.data import open_token_store
    from kdjax.data.example_rows import LaidOutExamples
    from kdjax.data.examples import open_example_store
    from kdjax.models import from_pretrained, load_tokenizer, save_pretrained

    size = qs.SIZES["tiny" if args.quick else "default"]
    steps = args.steps or (6 if args.quick else size["student_steps"])
    warm = args.warm_steps if not args.quick else min(args.warm_steps, 3)
    out = Path(args.out)
    t_start = time.perf_counter()
    info = prepare(out, size, progress=args.prepare_only)
    if args.prepare_only:
        print(f"inputs ready in {out}: " + ", ".join(f"{k} {v}" for k, v in paths(out).items()))
        return 0
    p = paths(out)
    teacher = from_pretrained(p["teacher"], dtype="float32", param_dtype="float32")
    tokenizer, grammar = load_tokenizer(p["plain_tokenizer"]), qs.Grammar()
    docs = open_token_store(p["eval"])
    compl = LaidOutExamples(open_example_store(p["heldout_examples"]))
    held = open_example_store(p["heldout_examples"])
    prompts = held.read(np.arange(min(args.samples, held.num_rows)))

    def measure(model, seed):
        bs = size["student_batch"]
        return {"ce_docs": heldout_ce(model, teacher, docs, bs)["ce"],
                "ce_compl": heldout_ce(model, teacher, compl, bs)["ce"],
                **sample_metrics(model, teacher, prompts, info, seed, args.max_new_tokens,
                                 tokenizer, grammar)}

    def arm(table, name, seed, n_steps, label=None, **kw):
        t0 = time.perf_counter()
        student, step_s = run_arm(name, seed, out, size, info, args, n_steps, **kw)
        m = measure(student, seed)
        m.update(step_ms=step_s * 1e3, seconds=time.perf_counter() - t0)
        results[table].setdefault(label or name, []).append(m)
        print(f"{table} {label or name} seed {seed}: " + ", ".join(f"{k} {v:.4g}"
                                                         for k, v in m.items()), flush=True)
        return student

    results = {"scratch": {"teacher": [measure(teacher, s) for s in args.seeds]}, "warm": {}}
    for name in args.arms:
        for seed in args.seeds:
            arm("scratch", name, seed, steps)
    if warm:
        for seed in args.seeds:
            start = arm("warm", "gkd λ=0", seed, warm, f"first {warm} steps: gkd λ=0",
                        prefix=f"warm{warm}_")
            init = save_pretrained(start, out / "runs" / f"warm_start_s{seed}" / "hf")
            for name in WARM_ARMS:
                arm("warm", name, seed, steps - warm, init_path=str(init), prefix="warm_")
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    bc.write(report(results, args, argv, size, steps, warm, len(prompts["prompt"]),
                    time.perf_counter() - t_start), args.results)
    return 0


COLUMNS = (("ce_docs", "CE docs", 4), ("ce_compl", "CE compl", 4), ("kl_samples", "KL(q‖p)", 4),
           ("teacher_logp", "log p", 3), ("accepted", "accepted", 3),
           ("finished", "finished", 3), ("step_ms", "ms/step", 1))


def table(results: dict) -> list[str]:
    """Markdown rows: per arm, the mean over seeds ± half their spread."""
    lines = ["| arm | " + " | ".join(c for _, c, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for arm, runs in results.items():
        cells = []
        for key, _, digits in COLUMNS:
            vals = [r[key] for r in runs if key in r]
            mean = statistics.fmean(vals) if vals else None
            half = (max(vals) - min(vals)) / 2 if vals else None
            cells.append("—" if mean is None else f"{mean:.{digits}f}" if len(vals) == 1
                         else f"{mean:.{digits}f} ± {half:.{digits}f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def report(results: dict, args, argv, size: dict, steps: int, warm: int, samples: int,
           seconds: float) -> str:
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        "## On-policy distillation on the quickstart grammar", "",
        f"Command: `{bc.command('on_policy_quality.py', argv)}` ({seconds / 60:.0f} min)", "",
        f"{bc.machine()}. Teacher {size['teacher']} (the quickstart's, "
        f"{size['teacher_steps']} steps on {size['teacher_docs']} documents); student "
        f"{size['student']}; seeds {seeds} (student initialisation, data order, sampling). "
        f"AdamW lr 3e-3, warm-up {max(1, steps // 20)} steps, cosine to 0.1×. Packed arms: "
        f"{size['student_batch']} rows × {size['seq_len']} tokens per step; sentence-example "
        f"arms: {args.example_batch} examples per step, completions ≤ {args.max_new_tokens} "
        "tokens, sampling temperature 1. Metrics (the script's docstring): held-out CE on "
        "documents and on sentence completions; on "
        f"{samples} free-running samples from held-out prompts, exact "
        "KL(student ‖ teacher) and the teacher's log-prob per completion token, the fraction "
        "that end with \" .\" and the fraction the grammar accepts; the median step time of "
        "each run. Mean over seeds ± half their difference.", "",
        f"### From scratch: every arm {steps} steps from the same initialisation", "",
        *table(results["scratch"])]
    if results["warm"]:
        lines += [
            "", f"### Warm start: {warm} steps of offline KD (gkd λ=0), then {steps - warm} "
            "steps of each arm", "",
            f"Each seed's student after {warm} steps of gkd λ=0 (first row) continues for "
            f"{steps - warm} steps under each arm (fresh optimizer, warm-up and cosine "
            "schedule), so every student has seen the same number of steps as above.", "",
            *table(results["warm"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(bc.main(build_parser, run))
