"""Ranking optimization on the quickstart's grammar: the teacher ranks the student's samples.

The feedback loop of docs/ranking.md, run with the CLI, stage by stage, per seed:

  start     a hard-label (SFT) student: the quickstart's baseline (next-token CE on the
            120-document student corpus, 400 steps), exported (`kdjax export`);
  generate  it completes every sentence beginning of those 120 documents (a sentence's
            first 1–3 words; benchmarks/on_policy_quality.py's sentence examples) K = 4
            times at temperature 1, each sample ending at " ." (`kdjax generate`);
  score     the teacher scores each candidate by its mean log-likelihood, and the
            starting student's summed log-prob of it is stored as DPO's frozen reference
            (`kdjax score method=likelihood reference=START`);
  pack      one prompt per row with its 4 scored candidates (`kdjax pack --layout
            preferences`);
  arms      the starting student trained on those rankings (`kdjax train`,
            objective.ranking), DPO (best vs worst candidate, β = 0.1, stored reference)
            and PRO (Plackett–Luce on all 4, length-averaged), each at two strengths: 36
            steps at lr 1e-4 (≈ 3 epochs of the ~375 ranked prompts) and 150 steps at lr
            5e-4 (≈ 13 epochs); `--arms` sets others (e.g. `pro:150:5e-4:1.0` adds an SFT
            term of weight 1 on the best candidate);
  eval      the teacher, the starting student and every arm, on held-out data.

The teacher is the quickstart's (trained on 4,000 grammar documents), shared by the seeds;
a seed sets the student's initialisation, its SFT, the sampling and the ranking runs.

Metrics (the same functions as benchmarks/on_policy_quality.py):
  CE docs      held-out CE on the quickstart's 300 held-out documents;
  KL(p‖q)      KL(teacher ‖ model) per token on those documents;
  accepted     the fraction of free-running samples (temperature 1) from held-out sentence
               beginnings that end with " ." and that `Grammar.accepts` (the grammar can
               generate prompt + completion);
  KL(q‖p)      exact per-token KL(model ‖ teacher) on those samples;
  log p        the teacher's mean log-prob per token of those samples (what the ranking
               rewards: the likelihood score is its per-sample mean).
The feedback itself is checked too: the fraction of the K candidates, of the chosen (best
by the teacher) and of the rejected (worst) that the grammar accepts.

    python benchmarks/ranking_quality.py                  # ≈ 12 min on 2 shared cores
    python benchmarks/ranking_quality.py --quick          # smoke run (numbers mean nothing)
    python benchmarks/ranking_quality.py --seed 0 --arms dpo:12:5e-4 pro:150:5e-4:1.0

Outputs under --out (default runs/ranking): inputs/ (corpus, tokenizers, stores, teacher:
benchmarks/on_policy_quality.py's `prepare`; `--inputs runs/on_policy` shares them with
that experiment), teacher_hf/, s<seed>/{start, gen, prefs, pref_store, <arm>}, each run's
config (<run>.yaml) and every command run (commands.sh); results.json caches the metrics.
A rerun skips every finished stage. The table goes to
benchmarks/results/ranking_quality.md (--quick: to --out).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc
import on_policy_quality as opq

K = 4
ARMS = ("dpo:36:1e-4", "pro:36:1e-4", "dpo:150:5e-4", "pro:150:5e-4")
QUICK_ARMS = ("dpo:4:1e-4", "pro:4:1e-4")
LABELS = {"dpo": "DPO", "pro": "PRO"}


class Arm(NamedTuple):
    """One ranking run per seed: `method:steps:lr[:sft_weight]` on the command line."""

    method: str
    steps: int
    lr: float
    sft_weight: float | None = None

    @classmethod
    def parse(cls, spec: str) -> Arm:
        parts = spec.split(":")
        if len(parts) not in (3, 4) or parts[0] not in LABELS:
            raise argparse.ArgumentTypeError(
                f"arm {spec!r}: want METHOD:STEPS:LR[:SFT_WEIGHT] with METHOD one of "
                f"{sorted(LABELS)}, e.g. dpo:36:1e-4 or pro:150:5e-4:1.0")
        return cls(parts[0], int(parts[1]), float(parts[2]),
                   float(parts[3]) if len(parts) == 4 else None)

    @property
    def name(self) -> str:
        sft = "" if self.sft_weight is None else f"_sft{self.sft_weight:g}"
        return f"{self.method}_{self.steps}_{self.lr:g}{sft}"

    @property
    def label(self) -> str:
        sft = "" if self.sft_weight is None else f", SFT weight {self.sft_weight:g}"
        return f"{LABELS[self.method]}, {self.steps} steps, lr {self.lr:g}{sft}"


def build_parser(parser=None):
    p = bc.new_parser(__doc__, parser)
    p.add_argument("--out", default=None, help="runs (default runs/ranking, --quick "
                   "runs/ranking_quick)")
    p.add_argument("--inputs", default=None, help="corpus, tokenizers, stores and teacher "
                   "(default OUT/inputs; built when missing)")
    p.add_argument("--seed", type=int, nargs="+", default=[0, 1], help="student seeds")
    p.add_argument("--arms", type=Arm.parse, nargs="+", default=None,
                   help=f"ranking runs METHOD:STEPS:LR[:SFT_WEIGHT] (default {' '.join(ARMS)}; "
                   f"--quick {' '.join(QUICK_ARMS)})")
    p.add_argument("--batch", type=int, default=32, help="prompts per ranking step")
    p.add_argument("--samples", type=int, default=512, help="held-out prompts sampled")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few steps")
    p.add_argument("--results", default=None, help="markdown table (default "
                   "benchmarks/results/ranking_quality.md; --quick: OUT/ranking_quality.md)")
    return p


def paths(out: Path, seed: int) -> dict[str, str]:
    """Where one seed's stages write (an arm's run is s<seed>/<arm name>)."""
    s = out / f"s{seed}"
    return {"seed": str(s), "start": str(s / "start"), "start_hf": str(s / "start" / "hf"),
            "gen": str(s / "gen"), "prefs": str(s / "prefs"),
            "pref_store": str(s / "pref_store"), "pref_train": str(s / "pref_store" / "train")}


def ranking_config(arm: Arm, seed: int, out: Path, inputs: Path, *, batch: int = 32) -> dict:
    """The `kdjax train` config (as a dict) of one ranking run from the starting student."""
    p, i = paths(out, seed), opq.paths(inputs)
    ranking = {"method": arm.method}
    if arm.method == "dpo":
        ranking.update(beta=0.1, reference="stored", pairs="best_worst")
    if arm.sft_weight is not None:
        ranking["sft_weight"] = arm.sft_weight
    steps = arm.steps
    return {"run_dir": str(Path(p["seed"]) / arm.name), "steps": steps,
            "global_batch_size": batch, "seed": seed,
            "model": {"path": p["start_hf"], "dtype": "float32"},
            "data": {"train": p["pref_train"], "eval": i["eval"],
                     "tokenizer": i["plain_tokenizer"]},
            "objective": {"ranking": ranking},
            "optimizer": {"lr": arm.lr, "warmup_steps": max(1, steps // 10),
                          "min_lr_ratio": 0.1, "weight_decay": 0.01},
            "mesh": {"data": -1},
            "checkpoint": {"every": 0, "keep": 1, "async_save": False},
            "eval": {"every": 0, "batches": 4},
            "logging": {"every": max(1, steps // 10), "tensorboard": False, "plot": False,
                        "progress": False}}


class Stages:
    """Runs `kdjax` commands in this process, logs them to OUT/commands.sh, and times them."""

    def __init__(self, out: Path):
        self.out, self.seconds = out, {}
        out.mkdir(parents=True, exist_ok=True)

    def kdjax(self, name: str, *argv: str) -> None:
        from kdjax import cli

        line = shlex.join(["kdjax", *argv])
        print(f"[{name}] {line}", flush=True)
        with open(self.out / "commands.sh", "a") as f:
            f.write(line + "\n")
        t0 = time.perf_counter()
        rc = cli.main(list(argv))
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"stage {name}: `{line}` exited with status {rc}")

    def train(self, name: str, config: dict, export_to: str, tokenizer: str) -> None:
        """`kdjax train` on `config` (written to RUN_DIR.yaml), then `kdjax export`; skipped
        when the export is there, refused when RUN_DIR.yaml holds other settings."""
        import yaml

        path, text = Path(config["run_dir"] + ".yaml"), yaml.safe_dump(
            config, sort_keys=False, allow_unicode=True)
        if path.is_file() and yaml.safe_load(path.read_text()) != config:
            raise ValueError(f"{path} holds other settings than this run's; delete "
                             f"{config['run_dir']} and {path}, or pass another --out")
        if _done(export_to, "config.json"):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.kdjax(name, "train", "--config", str(path))
        self.kdjax(name, "export", config["run_dir"], "--out", export_to,
                   "--tokenizer", tokenizer)


def _done(path: str, marker: str = "manifest.json") -> bool:
    f = Path(path) / marker
    return f.is_file() and (marker != "manifest.json" or json.loads(f.read_text()).get(
        "complete") is True)


def feedback_commands(seed: int, out: Path, inputs: Path, dot: int) -> dict[str, list[str]]:
    """The generate → score → pack commands of one seed (argv after `kdjax`; the
    configs/ranking headers give seed 0's)."""
    p, i = paths(out, seed), opq.paths(inputs)
    return {
        "generate": ["generate", "--model", p["start_hf"], "--prompts", i["examples"],
                     "--out", p["gen"], f"n={K}", "temperature=1.0",
                     f"max_new_tokens={opq.COMPLETION_LEN}", f"stop_token_ids=[{dot}]",
                     f"seed={seed}", "batch_size=64", "shard_examples=512", "dtype=float32"],
        "score": ["score", "--model", str(out / "teacher_hf"), "--data", p["gen"], "--out",
                  p["prefs"], "method=likelihood", "pairs=best_worst",
                  f"reference={p['start_hf']}", "batch_size=64", "dtype=float32"],
        "pack": ["pack", p["prefs"], "--layout", "preferences", "--tokenizer", p["start_hf"],
                 "--prompt-len", str(opq.PROMPT_LEN), "--completion-len",
                 str(opq.COMPLETION_LEN), "--out", p["pref_store"]]}


def run_seed(seed: int, out: Path, inputs: Path, size: dict, info: dict, args, st: Stages,
             arms: list[Arm]) -> None:
    """Every training stage of one seed (each skipped when its output is there)."""
    p, i = paths(out, seed), opq.paths(inputs)
    start = opq.arm_config("hard-label", seed, inputs, size, vocab=info["vocab"],
                           steps=size["student_steps"],
                           stop_ids=info["stop_ids"])
    st.train("start", dict(start, run_dir=p["start"]), p["start_hf"], i["plain_tokenizer"])
    commands = feedback_commands(seed, out, inputs, info["dot"])
    for stage, output in (("generate", p["gen"]), ("score", p["prefs"]),
                          ("pack", p["pref_train"])):
        if not _done(output):
            quiet = [] if stage == "pack" else ["progress=false"]
            st.kdjax(stage, *commands[stage], *quiet)
    for arm in arms:
        cfg = ranking_config(arm, seed, out, inputs, batch=args.batch)
        st.train(arm.method, cfg, cfg["run_dir"] + "/hf", i["plain_tokenizer"])


# ----------------------------------------------------------------------- metrics


def feedback(prefs: str, tokenizer, grammar) -> dict:
    """How often the grammar accepts the candidates, the chosen and the rejected ones."""
    from kdjax.score.dataset import PreferenceDataset

    def ok(r, j):
        ids = list(r["prompt_ids"]) + list(r["candidate_ids"][j])
        return grammar.accepts(tokenizer.decode(ids, skip_special_tokens=True))

    rows = list(PreferenceDataset(prefs).records())
    every = [ok(r, j) for r in rows for j in range(len(r["candidate_ids"]))]
    paired = [r for r in rows if r["chosen"]]
    return {"prompts": len(rows), "pairs": len(paired),
            "distinct": statistics.fmean(len(set(map(tuple, r["candidate_ids"]))) for r in rows),
            "accepted_candidates": statistics.fmean(every),
            "accepted_chosen": statistics.fmean(ok(r, r["chosen"][0]) for r in paired),
            "accepted_rejected": statistics.fmean(ok(r, r["rejected"][0]) for r in paired)}


def train_end(run_dir: str) -> dict:
    """The last logged training metrics of a ranking run."""
    from kdjax.train.metrics import read_jsonl

    recs = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl")
            if r.get("split", "train") == "train" and "reward_accuracy" in r]
    return {k: recs[-1][k] for k in ("reward_accuracy", "kl_ref", "loss") if k in recs[-1]}


# ----------------------------------------------------------------------- the experiment


def run(args, argv) -> int:
    from kdjax import quickstart as qs

    size = qs.SIZES["tiny" if args.quick else "default"]
    out = Path(args.out or ("runs/ranking_quick" if args.quick else "runs/ranking"))
    inputs = Path(args.inputs) if args.inputs else out / "inputs"
    arms = args.arms or [Arm.parse(a) for a in (QUICK_ARMS if args.quick else ARMS)]
    st, t_start = Stages(out), time.perf_counter()
    info = opq.prepare(inputs, size, progress=False)
    st.seconds["inputs"] = time.perf_counter() - t_start
    i = opq.paths(inputs)
    if not _done(str(out / "teacher_hf"), "config.json"):  # the teacher with its tokenizer
        st.kdjax("teacher", "export", str(Path(i["teacher"]).parent), "--out",
                 str(out / "teacher_hf"), "--tokenizer", i["plain_tokenizer"])
    for seed in args.seed:
        run_seed(seed, out, inputs, size, info, args, st, arms)
    t0 = time.perf_counter()
    results = evaluate_all(out, inputs, size, info, args, arms)
    st.seconds["eval"] = time.perf_counter() - t0
    bc.write(report(results, args, argv, size, arms, st.seconds,
                    time.perf_counter() - t_start),
             args.results or (out / "ranking_quality.md" if args.quick
                              else bc.RESULTS / "ranking_quality.md"))
    return 0


def evaluate_all(out: Path, inputs: Path, size: dict, info: dict, args, arms) -> dict:
    """{seed: {row: metrics, "feedback": ..., "train_end": {arm: ...}}}; each row is cached
    in OUT/results.json (dropped when --samples changes)."""
    import numpy as np

    from kdjax import quickstart as qs
    from kdjax.data import open_token_store
    from kdjax.data.examples import open_example_store
    from kdjax.models import from_pretrained, load_tokenizer

    i, cache = opq.paths(inputs), out / "results.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    if results.pop("samples", None) != args.samples:
        results = {}

    def load(path):
        return from_pretrained(path, dtype="float32", param_dtype="float32")

    teacher = load(str(out / "teacher_hf"))
    tokenizer, grammar = load_tokenizer(i["plain_tokenizer"]), qs.Grammar()
    docs, held = open_token_store(i["eval"]), open_example_store(i["heldout_examples"])
    prompts = held.read(np.arange(min(args.samples, held.num_rows)))
    for seed in args.seed:
        p, got = paths(out, seed), results.setdefault(str(seed), {})
        models = {"teacher": str(out / "teacher_hf"), "start": p["start_hf"],
                  **{a.name: str(Path(p["seed"]) / a.name / "hf") for a in arms}}
        for row, path in models.items():
            if row in got:
                continue
            model = teacher if row == "teacher" else load(path)
            ce = opq.heldout_ce(model, teacher, docs, size["student_batch"])
            got[row] = {"ce_docs": ce["ce"], "kl_docs": ce["kl_teacher"],
                        **opq.sample_metrics(model, teacher, prompts, info, seed,
                                             opq.COMPLETION_LEN, tokenizer, grammar)}
            print(f"seed {seed} {row}: " + ", ".join(f"{k} {v:.4g}" for k, v in
                                                      got[row].items()), flush=True)
            cache.write_text(json.dumps({"samples": args.samples, **results}, indent=2))
        got["sampled"] = len(prompts["prompt"])
        got["feedback"] = feedback(p["prefs"], tokenizer, grammar)
        got["train_end"] = {a.name: train_end(str(Path(p["seed"]) / a.name)) for a in arms}
    cache.write_text(json.dumps({"samples": args.samples, **results}, indent=2))
    return {s: results[str(s)] for s in map(str, args.seed)}


COLUMNS = (("ce_docs", "CE docs", 4), ("kl_docs", "KL(p‖q) docs", 4),
           ("accepted", "accepted", 3), ("kl_samples", "KL(q‖p) samples", 4),
           ("teacher_logp", "log p", 3), ("finished", "finished", 3),
           ("sample_len", "sample len", 2))


def _cell(vals: list[float], digits: int) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    half = (max(vals) - min(vals)) / 2
    return f"{statistics.fmean(vals):.{digits}f} ± {half:.{digits}f}"


def report(results: dict, args, argv, size: dict, arms: list[Arm], seconds: dict,
           total: float) -> str:
    """The markdown section: the metrics table (mean over seeds ± half the spread), the
    feedback's agreement with the grammar, and where the ranking runs ended."""
    seeds = list(results)
    n = results[seeds[0]]["sampled"]
    lines = [
        "## Ranking optimization on the quickstart grammar (DPO, PRO)", "",
        f"Command: `{bc.command('ranking_quality.py', argv)}` ({total / 60:.0f} min; "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")", "",
        f"{bc.machine()}. Teacher {size['teacher']} (the quickstart's); the starting student "
        f"{size['student']} is the quickstart's hard-label baseline ({size['student_steps']} "
        f"steps of next-token CE on {size['student_docs']} documents). It samples K = {K} "
        f"completions (temperature 1, ≤ {opq.COMPLETION_LEN} tokens, ending at \" .\") of "
        "each sentence beginning of those documents; the teacher scores them by mean "
        "log-likelihood; DPO (β = 0.1, best vs worst, stored reference = the starting "
        f"student) and PRO (all {K}, length-averaged, no SFT term unless stated) then train "
        f"the starting student, {args.batch} prompts per step (AdamW, warmup 10 %, cosine to "
        f"0.1× lr). Metrics on held-out data (script docstring); sampled metrics on "
        f"{n} held-out sentence beginnings. "
        + (f"Mean over seeds {', '.join(seeds)} ± half their spread." if len(seeds) > 1
           else f"Seed {seeds[0]}."), "",
        "| model | " + " | ".join(c for _, c, _ in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS)]
    rows = {"teacher": "teacher", "start": "start (hard-label SFT)",
            **{a.name: a.label for a in arms}}
    for row, name in rows.items():
        cells = [_cell([results[s][row][k] for s in seeds], d) for k, _, d in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "The feedback, per seed: prompts scored, pairs made (prompts whose 4 "
              "candidates tie are dropped), distinct candidates per prompt, and the "
              "fraction of the candidates, of the teacher's chosen (best) and of its "
              "rejected (worst) that the grammar accepts.", "",
              "| seed | prompts | pairs | distinct | accepted: all | chosen | rejected |",
              "|---|" + "---:|" * 6]
    for s in seeds:
        f = results[s]["feedback"]
        lines.append(f"| {s} | {f['prompts']} | {f['pairs']} | {f['distinct']:.2f} | "
                     f"{f['accepted_candidates']:.3f} | {f['accepted_chosen']:.3f} | "
                     f"{f['accepted_rejected']:.3f} |")
    lines += ["", "Where the ranking runs ended (last logged training batch, mean over "
              "the seeds): reward accuracy (the implicit reward orders the pair as the teacher "
              "did) and, for DPO, kl_ref = Σ(log π − log π_ref) / tokens over the batch's "
              "candidates.", "", "| run | reward accuracy | kl_ref |", "|---|---:|---:|"]
    for a in arms:
        ends = [results[s]["train_end"][a.name] for s in seeds]
        acc = _cell([e["reward_accuracy"] for e in ends], 3)
        kl = _cell([e["kl_ref"] for e in ends], 3) if "kl_ref" in ends[0] else "—"
        lines.append(f"| {a.label} | {acc} | {kl} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(bc.main(build_parser, run))
