"""`kdjax score`: the teacher scores K candidates per prompt and a preference dataset is
written (RLAIF / UltraFeedback-style feedback for the ranking objective).

The scorable prompts (≥ 2 non-empty candidates) are cut into shards of `shard_prompts`.
Each shard's candidates are scored in batches over the mesh (`kdjax.score.scorer`): the
teacher's mean log-prob of the completion (likelihood) or its expected grade (judge), or
kept from the data (labels); with a reference, every candidate's summed log-prob under it
too. Ranks and pairs follow (`kdjax.score.pairs`), and the shard is written and recorded
(`kdjax.score.dataset`). A rerun after a crash redoes only the missing shards and ends with
the same bytes: a row depends on its prompt and the plan, never on the batching. Every
process runs the same batches (the models are sharded over the global mesh); process 0
writes.
"""

from __future__ import annotations

import math
import time

import numpy as np

from kdjax.score.candidates import Group, check_tokenizer, read_candidates, scorable
from kdjax.score.config import ScoreConfig
from kdjax.score.dataset import PreferenceWriter
from kdjax.score.pairs import NO_PAIR, make_pairs, rank_of
from kdjax.score.reference import candidate_logprobs, load_model, move_to

COUNTS = ("candidates", "pairs", *NO_PAIR)


def run_score(config: ScoreConfig, *, teacher=None, reference=None, mesh=None,
              on_shard=None) -> dict:
    """Runs (or resumes) `kdjax score`; returns its summary dict.

    Args:
      config: the settings.
      teacher, reference: loaded models (`kdjax.generate.sample.Generator`) instead of
        `config.model` / `config.reference`.
      mesh: run on this mesh instead of `config.mesh` (the models move onto it).
      on_shard: called as `on_shard(shard, shards done this run)` after each shard.
    """
    from kdjax.distributed import is_primary

    config.check_paths()
    if teacher is None and config.method != "labels":
        teacher = load_model(config.model, config, mesh)
    if reference is None and config.reference is not None:
        reference = load_model(config.reference, config, mesh)
    for gen in (teacher, reference):
        if mesh is not None and gen is not None and gen.mesh is not mesh:
            move_to(gen, mesh)
    cands = read_candidates(config.data, format=config.format, split=config.split,
                            tokenizer=_data_tokenizer(config, teacher, reference))
    _check_inputs(config, cands, teacher, reference)
    groups, skipped = scorable(cands.groups)
    work = _Work(config, groups, teacher, reference)
    num_shards = max(1, math.ceil(len(groups) / config.shard_prompts))
    writer = PreferenceWriter(config.out, work.plan(cands), num_shards,
                              overwrite=config.overwrite)
    todo = writer.missing()
    spans = {s: (s * config.shard_prompts, min((s + 1) * config.shard_prompts, len(groups)))
             for s in todo}
    todo_candidates = sum(len(g.candidate_ids) for lo, hi in spans.values()
                          for g in groups[lo:hi])
    tokens, seconds = _score_shards(work, writer, spans, todo_candidates * work.passes,
                                    on_shard)
    summary = {"this_run_candidates": todo_candidates, "tokens": tokens, "seconds": seconds,
               "tokens_per_s": tokens / max(seconds, 1e-9), "path": config.out}
    if not is_primary():
        return summary
    infos = writer.shard_infos()
    counts = {k: sum(int(i[k]) for i in infos) for k in COUNTS}
    stats = {"method": config.method, "format": cands.format, "prompts": len(groups),
             "source_prompts": len(cands.groups), **counts, "skipped": skipped,
             "reference": reference is not None, "pair_mode": config.pairs,
             "min_margin": config.min_margin}
    writer.finish(stats)
    return {**summary, **stats}


def _score_shards(work: _Work, writer: PreferenceWriter, spans: dict, total: int,
                  on_shard) -> tuple[int, float]:
    """Scores and writes the shards of `spans` ({shard: (first, end) group}) under a
    progress bar of `total` sequences; returns (tokens run, seconds)."""
    from tqdm.auto import tqdm

    from kdjax.distributed import is_primary

    bar = tqdm(total=total, unit="seq", desc="score", dynamic_ncols=True,
               disable=not (work.config.progress and is_primary()))
    t0, tokens = time.perf_counter(), 0

    def on_batch(seqs, seq_tokens):
        nonlocal tokens
        tokens += seq_tokens
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s",
                            refresh=False)
        bar.update(seqs)

    for done, (shard, (lo, hi)) in enumerate(spans.items(), 1):
        rows, info = work.shard_rows(lo, hi, on_batch)
        if is_primary():
            writer.write_shard(shard, rows, info)
        if on_shard is not None:
            on_shard(shard, done)
    bar.close()
    return tokens, time.perf_counter() - t0


def _data_tokenizer(config: ScoreConfig, teacher, reference):
    """The tokenizer that turns text data into ids: `tokenizer`, else the teacher's, else
    the reference's (None: the data must carry ids)."""
    if config.tokenizer is not None:
        from kdjax.models import load_tokenizer

        return load_tokenizer(config.tokenizer)
    for gen in (teacher, reference):
        if gen is not None:
            return gen.tokenizer
    return None


def _check_inputs(config: ScoreConfig, cands, teacher, reference) -> None:
    if config.method == "labels" and cands.format not in ("pairs", "scored"):
        raise ValueError(f"method=labels keeps the data's own scores, but {config.data!r} is "
                         f"{cands.format} data without any; use method=likelihood or judge")
    if config.method == "likelihood":
        check_tokenizer(teacher.tokenizer_fingerprint, cands.tokenizer_fingerprint,
                        data=config.data, whose="the teacher's", why="the likelihood scores "
                        "the stored ids, so they must be the teacher's: score with a teacher "
                        "that shares the data's tokenizer, or use method=judge (it reads text)")
    if reference is not None:
        check_tokenizer(reference.tokenizer_fingerprint, cands.tokenizer_fingerprint,
                        data=config.data, whose="the reference's", why="the reference must "
                        "share the data's tokenizer (the student's)")


class _Work:
    """What each shard runs: the scorers, the judge's requests, and the plan."""

    def __init__(self, config: ScoreConfig, groups: list[Group], teacher, reference):
        from kdjax.score.scorer import Scorer, default_buckets

        self.config, self.groups = config, groups
        self.teacher, self.reference = teacher, reference
        self.judge = self.requests = None
        seq_width = max((len(g.prompt_ids) + len(c) for g in groups for c in g.candidate_ids),
                        default=1)
        if config.method == "judge":
            from kdjax.score.judge import build_requests, load_template

            self.template = load_template(config.judge.template)
            items = [(g.question, a) for g in groups for a in g.candidates]
            self.judge, flat = build_requests(teacher.tokenizer, self.template, items,
                                              config.judge.grades, config.judge.chat)
            ends = np.cumsum([0] + [len(g.candidates) for g in groups])
            self.requests = [flat[a:b] for a, b in zip(ends[:-1], ends[1:])]
        width = (max((len(r) for r in flat), default=1) if self.judge else seq_width)

        def scorer(gen, w):
            return Scorer(gen.model, gen.mesh, config.batch_size,
                          default_buckets(w, config.buckets))

        self.teacher_scorer = scorer(teacher, width) if teacher is not None else None
        self.ref_scorer = scorer(reference, seq_width) if reference is not None else None
        self.passes = (teacher is not None) + (reference is not None)

    def plan(self, cands) -> dict:
        """Everything the rows depend on (a rerun resumes only with the same plan)."""
        c = self.config
        judge = None
        if self.judge is not None:
            judge = {"template_sha256": self.template.sha256, "grades": list(self.judge.grades),
                     "grade_ids": list(self.judge.token_ids),
                     "strip_space": self.judge.strip_space, "chat": c.judge.chat}
        return {"method": c.method, "format": cands.format,
                "source_fingerprint": cands.fingerprint,
                "tokenizer_fingerprint": cands.tokenizer_fingerprint,
                "teacher_fingerprint": self.teacher and self.teacher.model_fingerprint,
                "teacher_tokenizer_fingerprint": self.teacher
                and self.teacher.tokenizer_fingerprint,
                "judge": judge, "pairs": c.pairs, "min_margin": c.min_margin,
                "reference_fingerprint": self.reference and self.reference.model_fingerprint,
                "shard_prompts": c.shard_prompts, "dtype": c.dtype,
                "param_dtype": c.param_dtype}

    def scores(self, lo: int, hi: int, on_batch) -> tuple[list, list | None]:
        """(scores `[K]` f32, grade masses `[K]` or None) per group of groups[lo:hi]."""
        groups = self.groups[lo:hi]
        if self.config.method == "labels":
            return [np.asarray(g.labels, np.float32) for g in groups], None
        if self.config.method == "likelihood":
            lps = candidate_logprobs(self.teacher_scorer, groups, on_batch)
            return [(s.astype(np.float64) / n).astype(np.float32) for s, n in lps], None
        from kdjax.score.judge import expected_grade

        requests = [r for rs in self.requests[lo:hi] for r in rs]
        lp = self.teacher_scorer.grade_logprobs(requests, self.judge.token_ids, on_batch)
        score, mass = expected_grade(lp, self.judge.grades)
        splits = np.cumsum([len(g.candidates) for g in groups])[:-1]
        return ([s.astype(np.float32) for s in np.split(score, splits)],
                [m.astype(np.float32) for m in np.split(mass, splits)])

    def shard_rows(self, lo: int, hi: int, on_batch) -> tuple[list[dict], dict]:
        """The rows of groups[lo:hi] (one shard) and its counts."""
        groups = self.groups[lo:hi]
        scores, masses = self.scores(lo, hi, on_batch)
        refs = (candidate_logprobs(self.ref_scorer, groups, on_batch)
                if self.ref_scorer is not None else None)
        rows, info = [], dict.fromkeys(COUNTS, 0)
        for i, g in enumerate(groups):
            try:
                chosen, rejected, margin, why = make_pairs(
                    scores[i], mode=self.config.pairs, min_margin=self.config.min_margin)
            except ValueError as e:
                raise ValueError(f"example {g.example_id}: {e}; check the teacher (dtype, "
                                 "weights) and the data") from None
            info["candidates"] += len(g.candidate_ids)
            info["pairs"] += len(chosen)
            if why is not None:
                info[why] += 1
            rows.append({"example_id": g.example_id, "prompt": g.prompt,
                         "question": g.question, "prompt_ids": g.prompt_ids,
                         "candidates": g.candidates, "candidate_ids": g.candidate_ids,
                         "source_index": g.source_index, "scores": scores[i].tolist(),
                         "rank": rank_of(scores[i]).tolist(), "chosen": chosen,
                         "rejected": rejected, "margin": margin,
                         "grade_mass": None if masses is None else masses[i].tolist(),
                         "ref_logps": None if refs is None else refs[i][0].tolist(),
                         "ref_counts": None if refs is None else refs[i][1].tolist()})
        return rows, info


def summary_lines(summary: dict) -> list[str]:
    s = summary
    lines = [f"preference dataset {s['path']}: {s['prompts']} prompts, {s['candidates']} "
             f"candidates scored by {s['method']}, {s['pairs']} pairs ({s['pair_mode']}, "
             f"min_margin {s['min_margin']}), complete",
             f"  this run: {s['this_run_candidates']} candidates, {s['tokens']:,} tokens in "
             f"{s['seconds']:.1f}s ({s['tokens_per_s']:,.0f} tokens/s)"]
    sk = s["skipped"]
    lines.append(f"  no pair: all scores equal {s['all_equal']}, below min_margin "
                 f"{s['below_margin']}; skipped: {sk['too_few_candidates']} prompts with < 2 "
                 f"candidates, {sk['empty_prompts']} empty prompts, "
                 f"{sk['empty_candidates']} empty candidates (of {s['source_prompts']} "
                 "prompts)")
    if s["reference"]:
        lines.append("  reference: ref_logps and ref_counts stored for every candidate")
    return lines
