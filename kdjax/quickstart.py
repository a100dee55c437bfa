"""`kdjax quickstart`: distillation end to end on a laptop, with no network.

    kdjax quickstart --out runs/quickstart --seed 0

1. makes a synthetic corpus from a small probabilistic grammar (a fixed "language":
   each choice is drawn from a skewed distribution that depends on the document's topic
   and on the words before it, so the next token is genuinely uncertain and a teacher's
   soft labels carry more than the one token that happened to follow);
2. trains a byte-level BPE tokenizer on it and packs token stores (teacher corpus,
   a small student corpus, held-out documents);
3. trains a teacher on the large corpus (hard labels), exports it as a Hugging Face
   directory, and precomputes its *sampled* signal on the student corpus;
4. distils a smaller student from that store, and trains a same-size student on hard
   labels only (same steps, data and seed);
5. reports both on the held-out documents (CE, perplexity, KL to the teacher, top-1
   agreement) in a table, `report.md` and `quickstart.png`.

The student corpus is small and trained for many epochs on purpose: that is where a
hard-label student overfits and distillation helps most. Its run time on 2 CPU cores is
measured in README.md ("Set up and run", next to the command).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------- the corpus

_WORDS = {
    "name": ["ada", "bob", "cyd", "dee", "eli", "fay", "gus", "hal", "ivy", "jon"],
    "animal": ["cat", "dog", "fox", "owl", "bee", "elk", "yak", "emu", "ant", "cow"],
    "adj": ["red", "big", "old", "shy", "wet", "odd", "fat", "tiny", "calm", "wild"],
    "verb": ["sees", "eats", "likes", "finds", "hides", "wants", "holds", "sells"],
    "object": ["apple", "stone", "book", "hat", "cup", "key", "rope", "drum", "lamp", "coin"],
    "place": ["park", "barn", "lake", "shop", "hill", "cave"],
    "time": ["today", "at noon", "at night", "in spring", "again", "slowly"],
}
_TEMPLATES = (
    # (slots in order; each slot is drawn given the topic and the slot named after ':')
    "the {adj} {animal:adj} {verb:animal} the {object:verb} .",
    "{name} {verb:name} a {object:verb} in the {place:name} .",
    "in the {place} the {animal:place} {verb:animal} {time:verb} .",
    "{name} and {name:name} saw a {adj} {animal:adj} near the {place:animal} .",
)
_TOPICS = 4


class Grammar:
    """A fixed random language: P(word | topic, conditioning word) tables, Dirichlet(0.4)."""

    def __init__(self, seed: int = 1234):
        rng = np.random.default_rng(seed)
        self.tables: dict[tuple, np.ndarray] = {}
        for t in range(_TOPICS):
            for slot, words in _WORDS.items():
                for cond in (None, *_WORDS):
                    n_cond = 1 if cond is None else len(_WORDS[cond])
                    self.tables[(t, slot, cond)] = rng.dirichlet(np.full(len(words), 0.4),
                                                                 size=n_cond)
        self.template_probs = rng.dirichlet(np.full(len(_TEMPLATES), 2.0), size=_TOPICS)

    def sentence(self, topic: int, rng: np.random.Generator) -> str:
        template = _TEMPLATES[rng.choice(len(_TEMPLATES), p=self.template_probs[topic])]
        chosen: dict[str, int] = {}
        out = []
        for piece in template.split(" "):
            if not piece.startswith("{"):
                out.append(piece)
                continue
            slot, _, cond = piece[1:-1].partition(":")
            row = chosen[cond] if cond else 0
            p = self.tables[(topic, slot, cond or None)][row]
            chosen[slot] = int(rng.choice(len(p), p=p))
            out.append(_WORDS[slot][chosen[slot]])
        return " ".join(out)

    def document(self, rng: np.random.Generator) -> str:
        topic = int(rng.integers(_TOPICS))
        return " ".join(self.sentence(topic, rng) for _ in range(int(rng.integers(2, 6))))

    def accepts(self, text: str) -> bool:
        """Whether `sentence` (one sentence) or `document` (2–5 sentences of one topic) can
        generate `text` exactly, i.e. with positive probability: single spaces, no
        leading or trailing whitespace, each sentence one template with a word of each
        slot's list that the topic's tables do not rule out.

        Args:
          text: the string to recognise (e.g. a decoded prompt + completion).
        Returns:
          True when some topic gives every sentence of `text` a positive probability.
        """
        words = text.split(" ")
        if not text or "" in words or words[-1] != ".":
            return False
        ends = [i + 1 for i, w in enumerate(words) if w == "."]
        sentences = [words[a:b] for a, b in zip([0, *ends[:-1]], ends)]
        if not 1 <= len(sentences) <= 5:
            return False
        return any(all(self.sentence_probability(s, t) > 0 for s in sentences)
                   for t in range(_TOPICS))

    def sentence_probability(self, words: list[str], topic: int) -> float:
        """P(`sentence(topic, ·)` returns `" ".join(words)`), summed over every template
        and word choice that spell it (multi-word choices like "at noon" can split a
        string more than one way).

        Args:
          words: the sentence split on single spaces, its final "." included.
          topic: the topic index in [0, 4).
        Returns:
          The probability (a float in [0, 1]; 0 for a string the grammar cannot make).
        """
        total = 0.0
        for i, template in enumerate(_TEMPLATES):
            total += self.template_probs[topic][i] * self._match(
                template.split(" "), words, topic, {})
        return total

    def _match(self, pieces: list[str], words: list[str], topic: int, chosen: dict) -> float:
        """P(the template pieces spell exactly `words` | the choices made so far)."""
        if not pieces:
            return 1.0 if not words else 0.0
        piece, rest = pieces[0], pieces[1:]
        if not piece.startswith("{"):
            return self._match(rest, words[1:], topic, chosen) if words[:1] == [piece] else 0.0
        slot, _, cond = piece[1:-1].partition(":")
        p = self.tables[(topic, slot, cond or None)][chosen[cond] if cond else 0]
        total = 0.0
        for j, choice in enumerate(_WORDS[slot]):
            n = choice.count(" ") + 1
            if words[:n] == choice.split(" ") and p[j] > 0:
                total += p[j] * self._match(rest, words[n:], topic, {**chosen, slot: j})
        return total


def write_corpus(path: Path, num_docs: int, rng: np.random.Generator, grammar: Grammar) -> list:
    docs = [grammar.document(rng) for _ in range(num_docs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return docs


# ----------------------------------------------------------------------- the run


SIZES = {
    # name: corpus sizes, model sizes, steps. "default" is the README's run; "tiny" is
    # the same pipeline small enough for the test suite (its numbers mean nothing).
    "default": dict(teacher_docs=4000, student_docs=120, eval_docs=300, vocab=384, seq_len=64,
                    teacher=dict(hidden_size=96, intermediate_size=256, num_layers=3,
                                 num_heads=4),
                    student=dict(hidden_size=64, intermediate_size=160, num_layers=2,
                                 num_heads=4),
                    teacher_steps=500, teacher_batch=32, student_steps=400,
                    student_batch=16, num_samples=32, num_slots=32, eval_batches=8),
    "tiny": dict(teacher_docs=200, student_docs=40, eval_docs=40, vocab=300, seq_len=32,
                 teacher=dict(hidden_size=32, intermediate_size=64, num_layers=1,
                              num_heads=2),
                 student=dict(hidden_size=16, intermediate_size=32, num_layers=1,
                              num_heads=2),
                 teacher_steps=6, teacher_batch=8, student_steps=4, student_batch=8,
                 num_samples=8, num_slots=8, eval_batches=2),
}


def _model_init(vocab: int, dims: dict, seq_len: int) -> dict:
    return dict(vocab_size=vocab, max_position_embeddings=max(seq_len, 128),
                tie_word_embeddings=True, **dims)


def train_config(out: Path, name: str, *, size: dict, seed: int, vocab: int, data: str,
                 eval_data: str, steps: int, batch: int, dims: dict, lr: float,
                 store: str | None = None, alpha: float = 1.0, progress: bool = True):
    """The `kdjax.train` Config of one quickstart run (f32 on CPU; bf16 is for accelerators)."""
    from kdjax.train.config import config_from_dict

    return config_from_dict({
        "run_dir": str(out / name), "steps": steps, "global_batch_size": batch, "seed": seed,
        "model": {"init": _model_init(vocab, dims, size["seq_len"]), "dtype": "float32"},
        "data": {"train": data, "eval": eval_data, "prefetch": 2},
        "store": {"path": store},
        "objective": {"alpha": alpha, "temperature": 1.0, "t2_scaling": False},
        "optimizer": {"lr": lr, "warmup_steps": max(1, steps // 20), "weight_decay": 0.01,
                      "min_lr_ratio": 0.1},
        "mesh": {"data": -1},
        "checkpoint": {"every": 0, "keep": 1, "async_save": False},
        "eval": {"every": max(1, steps // 8), "batches": size["eval_batches"],
                 "batch_size": batch},
        "logging": {"every": max(1, steps // 20), "tensorboard": True, "plot": True,
                    "progress": progress},
    })


def make_data(out: Path, size: dict, seed: int, progress: bool) -> dict:
    """Corpus → tokenizer → token stores; returns their paths."""
    from kdjax.data import build_token_store
    from kdjax.models import train_bpe_tokenizer

    grammar = Grammar()
    rng = np.random.default_rng(seed)
    teacher_docs = write_corpus(out / "corpus" / "teacher.jsonl", size["teacher_docs"], rng,
                                grammar)
    # the student corpus and the held-out documents: one file, split by build_token_store
    write_corpus(out / "corpus" / "student.jsonl", size["student_docs"] + size["eval_docs"],
                 rng, grammar)
    tok_dir = out / "tokenizer"
    train_bpe_tokenizer(teacher_docs, size["vocab"], tok_dir)
    kw = dict(seq_len=size["seq_len"], seed=seed, overwrite=True, progress=progress,
              text_field="text")
    build_token_store(str(out / "corpus" / "teacher.jsonl"), str(tok_dir),
                      out / "tokens_teacher", **kw)
    build_token_store(str(out / "corpus" / "student.jsonl"), str(tok_dir), out / "tokens",
                      eval_docs=size["eval_docs"], **kw)
    return {"tokenizer": str(tok_dir), "teacher_train": str(out / "tokens_teacher" / "train"),
            "train": str(out / "tokens" / "train"), "eval": str(out / "tokens" / "eval")}


def precompute_config(out: Path, teacher_dir: str, tokens: str, size: dict, seed: int,
                      progress: bool, name: str = "teacher_store",
                      tokenizer: str | None = None):
    """The PrecomputeConfig of the teacher's sampled signal (N draws, U slots per position)
    on `tokens`, packed with `tokenizer` (the teacher's). At the default size this is
    configs/precompute/quickstart_sampled.yaml."""
    from kdjax.teacher import PrecomputeConfig

    return PrecomputeConfig(teacher=teacher_dir, tokens=tokens, out=str(out / name),
                            tokenizer=tokenizer, mode="sampled",
                            num_samples=size["num_samples"], num_slots=size["num_slots"],
                            temperature=1.0, seed=seed, batch_size=size["student_batch"],
                            mesh=(-1, 1, 1), dtype="float32", param_dtype="float32",
                            overwrite=True, progress=progress)


def precompute_signal(out: Path, teacher_dir: str, tokens: str, size: dict, seed: int,
                      progress: bool, name: str = "teacher_store",
                      tokenizer: str | None = None) -> str:
    """Writes the teacher store of `precompute_config(...)`; returns its path."""
    from kdjax.teacher import precompute

    cfg = precompute_config(out, teacher_dir, tokens, size, seed, progress, name, tokenizer)
    precompute(cfg)
    return cfg.out


def _final_eval(summary: dict, teacher: tuple, eval_tokens: str, size: dict) -> dict:
    """Held-out CE, perplexity, KL(teacher ‖ student) at T = 1 and top-1 agreement."""
    import jax

    from kdjax.data import Loader, open_token_store
    from kdjax.train import evaluate as ev

    state = summary["state"]
    mesh = jax.tree.leaves(state.params)[0].sharding.mesh
    store = open_token_store(eval_tokens)
    bs = size["student_batch"]
    loader = Loader(store, global_batch_size=bs, seed=0, mesh=mesh, shuffle=False)
    n = max(1, store.num_rows // bs)  # the whole held-out set (less a partial batch)
    fn = ev.make_eval_fn(state.graphdef, mesh, teacher=teacher)
    return ev.evaluate(fn, state.params["model"], state.rest, (loader.batch_at(i)
                                                                for i in range(n)))


def run(out: str | os.PathLike, seed: int = 0, *, size: str = "default",
        progress: bool = True) -> dict:
    """The whole quickstart; returns {"distilled": metrics, "baseline": metrics, …}."""
    from kdjax.models import load_tokenizer, save_pretrained
    from kdjax.train.loop import build_teacher, train

    t0 = time.perf_counter()
    out, sz = Path(out), SIZES[size]
    phases: dict[str, float] = {}

    def say(msg):  # a phase starts: time the previous one (keyed by its first words)
        now = time.perf_counter()
        if phases:
            last = next(reversed(phases))
            phases[last] = now - phases[last]
        phases[msg.split("] ", 1)[1].split(" — ")[0]] = now
        if progress:
            print(msg, flush=True)

    say(f"[1/6] data — corpus, tokenizer and token stores in {out}")
    paths = make_data(out, sz, seed, progress)
    vocab = len(load_tokenizer(paths["tokenizer"]))
    common = dict(size=sz, seed=seed, vocab=vocab, eval_data=paths["eval"], progress=progress)
    say("[2/6] teacher — hard labels, large corpus")
    t_sum = train(train_config(out, "teacher", data=paths["teacher_train"],
                               steps=sz["teacher_steps"], batch=sz["teacher_batch"],
                               dims=sz["teacher"], lr=3e-3, **common))
    teacher_dir = str(out / "teacher" / "hf")
    save_pretrained(t_sum["state"].model(), teacher_dir)
    say("[3/6] precompute — the teacher's sampled signal on the student corpus")
    store = precompute_signal(out, teacher_dir, paths["train"], sz, seed, progress,
                              tokenizer=paths["tokenizer"])
    student = dict(data=paths["train"], steps=sz["student_steps"], batch=sz["student_batch"],
                   dims=sz["student"], lr=3e-3, **common)
    say("[4/6] distilled — student distilled from the sampled store")
    d_sum = train(train_config(out, "distilled", store=store, alpha=0.0, **student))
    say("[5/6] baseline — same student on hard labels only (same steps, data, seed)")
    b_sum = train(train_config(out, "baseline", alpha=1.0, **student))
    say("[6/6] eval — all three on held-out documents, against the teacher")
    teacher = build_teacher(teacher_dir, "float32", None, "none")
    results = {"teacher": _final_eval(t_sum, teacher, paths["eval"], sz),
               "distilled": _final_eval(d_sum, teacher, paths["eval"], sz),
               "baseline": _final_eval(b_sum, teacher, paths["eval"], sz)}
    say("[done] report")
    del phases["report"]
    report = {"seed": seed, "size": size, "seconds": time.perf_counter() - t0,
              "phase_seconds": phases,
              "results": results, "out": str(out.resolve()),
              "runs": {k: s["run_dir"] for k, s in
                       (("teacher", t_sum), ("distilled", d_sum), ("baseline", b_sum))}}
    write_report(out, report, sz)
    return report


# ----------------------------------------------------------------------- the report

_COLUMNS = (("ce", "held-out CE"), ("perplexity", "perplexity"),
            ("kl_teacher", "KL(teacher‖model)"), ("top1_agreement", "top-1 agreement"))


def table(results: dict) -> str:
    """A markdown table of the held-out metrics per model."""
    lines = ["| model | " + " | ".join(c for _, c in _COLUMNS) + " |",
             "|---|" + "---|" * len(_COLUMNS)]
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k, _ in _COLUMNS) + " |")
    return "\n".join(lines)


def _plot(out: Path, report: dict) -> str | None:
    """Held-out CE over training for both students (and the teacher's final CE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdjax.train.metrics import read_jsonl

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("distilled", "baseline"):
        recs = [r for r in read_jsonl(Path(report["runs"][name]) / "metrics.jsonl")
                if r.get("split") == "eval" and "ce" in r]
        ax.plot([r["step"] for r in recs], [r["ce"] for r in recs], marker="o", label=name)
    ax.axhline(report["results"]["teacher"]["ce"], color="gray", ls="--", label="teacher")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title(f"kdjax quickstart (seed {report['seed']})")
    ax.legend()
    path = out / "quickstart.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _best_eval_ce(run_dir: str) -> tuple[float, int]:
    """The lowest periodic held-out CE of a run and its step (what early stopping gets)."""
    from kdjax.train.metrics import read_jsonl

    recs = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl")
            if r.get("split") == "eval" and "ce" in r]
    best = min(recs, key=lambda r: r["ce"])
    return best["ce"], best["step"]


def write_report(out: Path, report: dict, size: dict) -> None:
    r = report["results"]
    gain = r["baseline"]["ce"] - r["distilled"]["ce"]
    report["ce_gain"] = gain
    report["best_eval_ce"] = {k: _best_eval_ce(report["runs"][k])
                              for k in ("distilled", "baseline")}
    report["plot"] = _plot(out, report)
    best = report["best_eval_ce"]
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in report["phase_seconds"].items())
    text = "\n".join([
        f"# kdjax quickstart (seed {report['seed']}, size {report['size']})", "",
        f"Teacher: {size['teacher']} on {size['teacher_docs']} documents; students: "
        f"{size['student']} on {size['student_docs']} documents for {size['student_steps']} "
        f"steps of {size['student_batch']} rows. Distilled from the teacher's sampled signal "
        f"(N={size['num_samples']} draws, U={size['num_slots']} slots per token); the "
        "baseline sees hard labels only. Metrics on held-out documents:", "",
        table(r), "",
        f"Held-out CE, baseline − distilled: {gain:+.4f} nats/token. Best periodic held-out "
        f"CE during training (what early stopping would keep): baseline "
        f"{best['baseline'][0]:.4f} (step {best['baseline'][1]}), distilled "
        f"{best['distilled'][0]:.4f} (step {best['distilled'][1]}).", "",
        f"Time: {report['seconds']:.0f} s in all ({phases}).", "",
        "![held-out CE](quickstart.png)", ""])
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(report, indent=2))


# ----------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="distil a small student on a synthetic corpus (no network)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quickstart", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of data sampling and init")
    p.add_argument("--size", choices=sorted(SIZES), default="default",
                   help="'tiny' is a seconds-long smoke run (its numbers mean nothing)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    report = run(args.out, args.seed, size=args.size)
    print()
    print(table(report["results"]))
    print(f"\ndistilled − baseline held-out CE: {-report['ce_gain']:+.4f} nats/token "
          f"({report['seconds']:.0f} s)")
    print(f"report: {Path(report['out']) / 'report.md'}\nplot:   {report['plot']}\n"
          f"runs:   {', '.join(report['runs'].values())}")
    return 0
