"""The candidates `kdjax score` ranks: prompts with K completions each, from four sources.

- `generated`: a generated dataset (`kdjax generate`): the records of one `example_id` are
  its candidates, in `sample_index` order (K = n, or fewer after curation); the token ids
  are used as generated, the judge reads `instruction` (expansion) or `prompt` and
  `completion` as text.
- `scored`: a preference dataset (`kdjax score --out`), to re-score or to add a reference;
  its scores are the labels.
- `pairs`: a `datasets` source in the TRL preference format: `prompt`/`chosen`/`rejected`
  as text (standard) or chat messages (conversational), or `chosen`/`rejected` whole
  conversations that share their turns before the last (implicit prompt). Candidate 0 is
  chosen, 1 rejected; the labels are `score_chosen`/`score_rejected` when present, else
  1 and 0.
- `completions`: a `datasets` source with `prompt` (text or messages) and `completions` (a
  list of texts, or of assistant messages / message lists).

Text is turned into ids as `kdjax pack --layout examples` does: chat messages through
`kdjax.data.examples.encode_example` (the chat template with the generation prompt; the
completion is what the template adds for the assistant turn); plain text as the prompt with
the tokenizer's own special tokens and the completion without them, plus EOS (as TRL's DPO
tokenization, which adds EOS to chosen and rejected).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

from kdjax.storage.errors import StoreMismatchError
from kdjax.storage.manifest import read_manifest


@dataclasses.dataclass
class Group:
    """One prompt and its K candidate completions."""

    example_id: int
    prompt: str
    """The prompt as text (as stored, chat markup included)."""
    prompt_ids: list[int]
    question: str
    """What the judge reads as the prompt (the last user turn, or the instruction)."""
    candidates: list[str]
    """The completions as text."""
    candidate_ids: list[list[int]]
    source_index: list[int]
    """Each candidate's index in the source (sample_index; 0 chosen / 1 rejected)."""
    labels: list[float] | None = None
    """The source's own scores (pairs, scored), else None."""

    def select(self, keep: Sequence[int]) -> Group:
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]
        return dataclasses.replace(self, candidates=pick(self.candidates),
                                   candidate_ids=pick(self.candidate_ids),
                                   source_index=pick(self.source_index),
                                   labels=pick(self.labels))


@dataclasses.dataclass
class Candidates:
    """Every group of a source, what tokenized it and a content fingerprint."""

    groups: list[Group]
    format: str
    tokenizer_fingerprint: str | None
    fingerprint: str


def detect_format(data: str, columns: Sequence[str] | None = None) -> str:
    """`generated` | `scored` by a directory's manifest kind, else by the columns."""
    from kdjax.generate.dataset import KIND as GENERATED
    from kdjax.score.dataset import KIND as SCORED

    if os.path.isfile(os.path.join(os.path.expanduser(data), "manifest.json")):
        kind = read_manifest(os.path.expanduser(data), require_complete=False).get("kind")
        if kind in (GENERATED, SCORED):
            return "generated" if kind == GENERATED else "scored"
    if columns is None:
        return "text"
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "pairs"
    if {"prompt", "completions"} <= cols:
        return "completions"
    raise ValueError(f"data: cannot tell the format of {data!r} from its columns "
                     f"{sorted(cols)}; it needs chosen/rejected (TRL pairs, with or without "
                     "a prompt) or prompt + completions, or use a generated dataset")


def read_candidates(data: str, *, format: str = "auto", split: str = "train",
                    tokenizer=None) -> Candidates:
    """All groups of `data`.

    Args:
      data: a generated or preference dataset directory, or a `datasets` source.
      format: one of `ScoreConfig.format`'s values.
      split: the split of a `datasets` source.
      tokenizer: turns text sources into ids (unused for generated and scored data).
    """
    kind = detect_format(data) if format == "auto" else format
    if kind == "generated":
        return _read_generated(data)
    if kind == "scored":
        return _read_scored(data)
    from kdjax.data.sources import load_source
    from kdjax.data.tokenize import tokenizer_fingerprint

    ds = load_source(data, split=split)
    if kind == "text":
        kind = detect_format(data, ds.column_names)
    if tokenizer is None:
        raise ValueError(f"data: {data!r} is text ({kind}); set tokenizer=DIR (the student's) so "
                         "it can be turned into token ids")
    read = _pair_group if kind == "pairs" else _completions_group
    groups = [read(row, i, tokenizer) for i, row in enumerate(ds)]
    return Candidates(groups, kind, tokenizer_fingerprint(tokenizer), _fingerprint(groups))


def _fingerprint(groups: Sequence[Group]) -> str:
    h = hashlib.sha256()
    for g in groups:
        h.update(json.dumps([g.example_id, g.prompt_ids, g.question, g.candidates,
                             g.candidate_ids, g.source_index, g.labels]).encode())
    return h.hexdigest()


def _read_generated(path: str) -> Candidates:
    from kdjax.generate.dataset import GeneratedDataset

    source = GeneratedDataset(path)
    by_example: dict[int, list[dict]] = {}
    for r in source.records():
        by_example.setdefault(int(r["example_id"]), []).append(r)
    groups = []
    for eid, records in by_example.items():
        records.sort(key=lambda r: r["sample_index"])
        first = records[0]
        if any(r["prompt_ids"] != first["prompt_ids"] for r in records):
            raise StoreMismatchError(f"generated dataset {path!r}: the samples of example "
                                     f"{eid} have different prompts; it is damaged or merged "
                                     "from several runs")
        groups.append(Group(
            example_id=eid, prompt=first["prompt"], prompt_ids=list(first["prompt_ids"]),
            question=first.get("instruction") or first["prompt"],
            candidates=[r["completion"] for r in records],
            candidate_ids=[list(r["completion_ids"]) for r in records],
            source_index=[int(r["sample_index"]) for r in records]))
    return Candidates(groups, "generated", source.manifest.get("tokenizer_fingerprint"),
                      _fingerprint(groups))


def _read_scored(path: str) -> Candidates:
    from kdjax.score.dataset import PreferenceDataset

    source = PreferenceDataset(path)
    groups = [Group(example_id=int(r["example_id"]), prompt=r["prompt"],
                    prompt_ids=list(r["prompt_ids"]), question=r["question"],
                    candidates=list(r["candidates"]),
                    candidate_ids=[list(c) for c in r["candidate_ids"]],
                    source_index=list(r["source_index"]), labels=list(r["scores"]))
              for r in source.records()]
    return Candidates(groups, "scored", source.tokenizer_fingerprint, _fingerprint(groups))


# ------------------------------------------------------------------- text sources


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) for m in x)


def _last_user(messages) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else (messages[-1]["content"] if messages else "")


def _encode(tokenizer, prompt, completion, where: str):
    """(prompt ids, completion ids, prompt text, question, answer text) of one candidate;
    `prompt` is text or messages, `completion` text, one message or a message list."""
    from kdjax.data.examples import encode_example

    if _is_messages(prompt) or _is_messages(completion) or isinstance(completion, dict):
        turns = [completion] if isinstance(completion, dict) else completion
        if isinstance(turns, str):
            turns = [{"role": "assistant", "content": turns}]
        prompt_turns = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                        else list(prompt or [])) + list(turns[:-1])
        if not turns or turns[-1].get("role") != "assistant":
            raise ValueError(f"{where}: the completion must end with an assistant message, "
                             f"got {turns[-1:]!r}")
        p_ids, c_ids = encode_example(tokenizer, [*prompt_turns, turns[-1]])
        text = tokenizer.decode(p_ids, skip_special_tokens=False)
        return ([int(i) for i in p_ids], [int(i) for i in c_ids], text,
                _last_user(prompt_turns), turns[-1]["content"])
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError(f"{where}: expected text or chat messages, got "
                         f"{type(prompt).__name__} prompt and {type(completion).__name__} "
                         "completion")
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c_ids = [*c_ids, int(tokenizer.eos_token_id)]
    return list(p_ids), list(c_ids), prompt, prompt, completion


def _group(eid: int, encoded: list[tuple], source_index: list[int], labels, where: str):
    prompts = {tuple(e[0]) for e in encoded}
    if len(prompts) > 1:
        raise ValueError(f"{where}: the candidates have different prompts once tokenized "
                         "(implicit-prompt conversations must share every turn but the last)")
    first = encoded[0]
    return Group(example_id=eid, prompt=first[2], prompt_ids=first[0], question=first[3],
                 candidates=[e[4] for e in encoded], candidate_ids=[e[1] for e in encoded],
                 source_index=source_index, labels=labels)


def _pair_group(row: dict, i: int, tokenizer) -> Group:
    where = f"row {i}"
    prompt = row.get("prompt")
    chosen, rejected = row["chosen"], row["rejected"]
    if prompt is None:  # implicit prompt: whole conversations
        if not (_is_messages(chosen) and _is_messages(rejected)):
            raise ValueError(f"{where}: without a prompt column, chosen and rejected must be "
                             "whole conversations (lists of messages)")
        prompt = []
    encoded = [_encode(tokenizer, prompt, c, where) for c in (chosen, rejected)]
    if "score_chosen" in row and "score_rejected" in row:
        labels = [float(row["score_chosen"]), float(row["score_rejected"])]
    else:
        labels = [1.0, 0.0]
    return _group(i, encoded, [0, 1], labels, where)


def _completions_group(row: dict, i: int, tokenizer) -> Group:
    where = f"row {i}"
    completions = row["completions"]
    if not isinstance(completions, list):
        raise ValueError(f"{where}: completions must be a list, got "
                         f"{type(completions).__name__}")
    if not completions:
        return Group(i, "", [], "", [], [], [], None)
    encoded = [_encode(tokenizer, row["prompt"], c, where) for c in completions]
    return _group(i, encoded, list(range(len(completions))), None, where)


def scorable(groups: Sequence[Group]) -> tuple[list[Group], dict[str, int]]:
    """The groups that can be ranked, and counts of the rest: empty completions are dropped
    (nothing to score), then prompts left with fewer than 2 candidates (nothing to
    compare), then prompts without tokens (nothing predicts a completion's first token)."""
    out = []
    counts = {"empty_prompts": 0, "empty_candidates": 0, "too_few_candidates": 0}
    for g in groups:
        keep = [k for k, ids in enumerate(g.candidate_ids) if len(ids) > 0]
        counts["empty_candidates"] += len(g.candidate_ids) - len(keep)
        if len(keep) < 2:
            counts["too_few_candidates"] += 1
            continue
        if not g.prompt_ids:
            counts["empty_prompts"] += 1
            continue
        out.append(g if len(keep) == len(g.candidate_ids) else g.select(keep))
    return out, counts


def check_tokenizer(fingerprint: str | None, data_fingerprint: str | None, *, data: str,
                    whose: str, why: str) -> None:
    """Raises StoreMismatchError unless a model's tokenizer is the data's."""
    if fingerprint == data_fingerprint:
        return
    got = f"{data_fingerprint[:16]}…" if isinstance(data_fingerprint, str) else "none recorded"
    raise StoreMismatchError(
        f"data: {data!r} holds token ids of another tokenizer (fingerprint {got}) than "
        f"{whose} ({str(fingerprint)[:16]}…); {why}")
