"""Example stores as the trainer reads them (`kdjax.data.Loader` takes either view).

- `TrainingExamples`: the rows as stored (`prompt`, `prompt_len`, optional `completion`,
  `completion_len`) with `example_id` as uint32 (JAX runs without 64-bit ints): what
  the on-policy step samples completions for (`kdjax.train.on_policy`).
- `LaidOutExamples`: each row laid out as prompt ‖ completion (`kdjax.train.layout`):
  `tokens, targets, loss_mask, segment_ids, positions [P + C]`, the packed-row format,
  so held-out CE and KL to the teacher on the dataset completions use the ordinary
  evaluator.
"""

from __future__ import annotations

import numpy as np


class TrainingExamples:
    """An `ExampleStore` for the on-policy step. `seq_len` is the width of a laid-out
    row, P + max(C, max_new_tokens)."""

    def __init__(self, store, *, max_new_tokens: int = 0):
        self.store = store
        self.num_rows = store.num_rows
        self.fingerprint = store.fingerprint
        self.seq_len = store.prompt_len + max(store.completion_len or 0, max_new_tokens)

    def read(self, rows) -> dict[str, np.ndarray]:
        out = dict(self.store.read(rows))
        out["example_id"] = (out["example_id"] % (1 << 32)).astype(np.uint32)
        return out


class LaidOutExamples:
    """An `ExampleStore` with completions, read as laid-out (packed-format) rows."""

    def __init__(self, store):
        if not store.has_completions:
            raise ValueError(f"{store.path} has no completions, so there is nothing to "
                             "evaluate on; pack the held-out data with --completion-len "
                             "(prompt/response or chat data)")
        self.store = store
        self.num_rows = store.num_rows
        self.fingerprint = store.fingerprint
        self.seq_len = store.prompt_len + store.completion_len
        self.pad_id = store.pad_id

    def read(self, rows) -> dict[str, np.ndarray]:
        from kdjax.train.layout import completion_layout

        d = self.store.read(rows)
        laid = completion_layout(d["prompt"], np.maximum(d["prompt_len"], 1), d["completion"],
                                 d["completion_len"], self.pad_id)
        return {k: np.asarray(v) for k, v in laid.items()}
