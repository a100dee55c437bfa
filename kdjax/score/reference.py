"""Models of `kdjax score` and the candidates' sequence log-probs under them.

A frozen reference (DPO's π_ref; by default the student's starting checkpoint) scores each
candidate once here: `ref_logps` = Σ_t log π_ref(c_t | prompt, c_<t) over the candidate's
every token, `ref_counts` = its token count, stored beside the scores so the ranking
objective never runs the reference again. The teacher's likelihood score is the same sum
under the teacher, divided by the count.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence

import numpy as np

from kdjax.score.candidates import Group


def load_model(path: str, config, mesh=None):
    """The `kdjax.generate.sample.Generator` (model, tokenizer, fingerprints, mesh) of a
    Hugging Face directory, .gguf file or kdjax run directory, in `config.dtype`. With
    `mesh`, the weights are moved onto it (the model then runs on its devices only)."""
    from kdjax.generate.sample import load_generator

    gen = load_generator(types.SimpleNamespace(
        model=path, tokenizer=None, dtype=config.dtype,
        param_dtype=config.param_dtype or config.dtype, mesh=config.mesh))
    return gen if mesh is None else move_to(gen, mesh)


def move_to(gen, mesh):
    """Places a loaded model's weights on `mesh` by their logical axes (in place)."""
    from kdjax.sharding import shard_model

    shard_model(gen.model, mesh)
    gen.mesh = mesh
    return gen


def candidate_logprobs(scorer, groups: Sequence[Group],
                       on_batch: Callable[[int, int], None] | None = None
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per group: (Σ log-probs `[K]` f32, token counts `[K]` int32) of its candidates given
    its prompt, under `scorer`'s model (a `kdjax.score.scorer.Scorer`)."""
    prompts = [g.prompt_ids for g in groups for _ in g.candidate_ids]
    completions = [c for g in groups for c in g.candidate_ids]
    sums, counts = scorer.sequence_logprobs(prompts, completions, on_batch)
    out, k = [], 0
    for g in groups:
        n = len(g.candidate_ids)
        out.append((sums[k:k + n], counts[k:k + n]))
        k += n
    return out
