"""`train(config) -> summary`: the distillation loop, top to bottom.

    mesh → stores → student (+ online teacher) → objective → state (fresh or resumed)
    → for step: batch_at(step) → train_step → log → [eval] → [checkpoint] → summary

The data position is a pure function of the step (`Loader.batch_at`), the state holds
step, params, optimizer state and RNG, and the step is deterministic, so a run killed at
any point and resumed from its last checkpoint ends with the same parameters as an
uninterrupted run. Extra behaviour plugs in through `hooks`: callables
`hook(step, state, metrics)` run after every step (no subclassing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from kdjax.train import evaluate as ev
from kdjax.train.checkpoint import Checkpointer, abstract_like
from kdjax.train.config import Config
from kdjax.train.metrics import FlopCounter, RunLogger
from kdjax.train.state import create_train_state, split_model
from kdjax.train.step import make_train_step

Hook = Callable[[int, Any, dict], None]


class NonFiniteError(FloatingPointError):
    """Too many consecutive non-finite updates: training stopped."""


def build_student(config: Config, mesh) -> nnx.Module:
    """The student Decoder: from a checkpoint (`model.path`), from the teacher's layers
    (`model.init_from` + `keep_layers`) or random init (`model.init`), each created
    directly in its sharding on `mesh` (no host or one-device copy)."""
    from kdjax import models

    m = config.model
    if m.path is not None:
        return models.from_pretrained(m.path, mesh=mesh, **m.overrides())
    if m.init_from is not None:
        return models.init_from_teacher(m.init_from, m.keep_layers, mesh=mesh,
                                        **m.overrides())
    return models.init_decoder(m.decoder_config(), seed=config.seed, mesh=mesh)


def build_teacher(path: str, dtype: str, mesh, remat: str = "full") -> tuple:
    """`(graphdef, params, rest)` of a frozen teacher loaded from a HF directory."""
    from kdjax import models

    teacher = models.from_pretrained(path, mesh=mesh, dtype=dtype, param_dtype=dtype,
                                     remat=remat)
    return split_model(teacher)


def _open_stores(config: Config, vocab_size: int):
    from kdjax.data import open_token_store
    from kdjax.teacher import open_teacher_store

    if config.objective.on_policy.active:
        return _open_example_stores(config, vocab_size)
    if config.objective.ranking.active:
        return _open_preference_store(config, vocab_size)
    train = open_token_store(config.data.train)
    evals = open_token_store(config.data.eval) if config.data.eval else None
    store = eval_store = None
    if config.store.path:
        store = open_teacher_store(config.store.path)
        store.check_compatible(train, vocab_size=vocab_size)
        if config.store.mode is not None and store.mode != config.store.mode:
            raise ValueError(f"store.mode={config.store.mode!r} but {config.store.path} holds "
                             f"a {store.mode!r} store; fix store.mode or point to another store")
        check_store_temperature(store, config.objective, "store.path")
    if config.store.eval_path:
        eval_store = open_teacher_store(config.store.eval_path)
        eval_store.check_compatible(evals, vocab_size=vocab_size)
        check_store_temperature(eval_store, None, "store.eval_path")
    return train, evals, store, eval_store


def _open_example_stores(config: Config, vocab_size: int):
    """On-policy runs read example rows (`kdjax pack --layout examples`): the train store
    as stored (the step samples completions), the eval store laid out with its dataset
    completions (held-out CE and KL to the online teacher)."""
    from kdjax.data.example_rows import LaidOutExamples, TrainingExamples
    from kdjax.data.examples import open_example_store

    op = config.objective.on_policy
    stores = []
    for key, path in (("data.train", config.data.train), ("data.eval", config.data.eval)):
        if path is None:
            stores.append(None)
            continue
        try:
            store = open_example_store(path)
        except Exception as e:
            raise ValueError(f"{key}: on-policy training (objective.on_policy.loss="
                             f"{op.loss}) reads example rows; {e}") from e
        if store.vocab_size > vocab_size:
            raise ValueError(f"{key}: {path} was packed with a vocabulary of "
                             f"{store.vocab_size} ids but the student has {vocab_size}")
        stores.append(store)
    train, evals = stores
    if not train.has_completions and op.fraction < 1.0:
        raise ValueError(f"data.train: {train.path} has prompts only, so every completion "
                         f"must be sampled: set objective.on_policy.fraction=1.0 (got "
                         f"{op.fraction}), or pack prompt/response data")
    train = TrainingExamples(train, max_new_tokens=op.max_new_tokens)
    return train, (LaidOutExamples(evals) if evals is not None else None), None, None


def _open_preference_store(config: Config, vocab_size: int):
    """Ranking runs read a preference store (`kdjax pack --layout preferences`); held-out
    CE (and KL to a teacher store) on an ordinary token store in data.eval, if given."""
    from kdjax.data import open_token_store
    from kdjax.data.preferences import open_preference_store
    from kdjax.teacher import open_teacher_store

    r = config.objective.ranking
    try:
        train = open_preference_store(config.data.train)
    except Exception as e:
        raise ValueError(f"data.train: the ranking objective ({r.method}) reads a preference "
                         f"store (`kdjax pack DATASET --layout preferences`); {e}") from e
    if train.vocab_size > vocab_size:
        raise ValueError(f"data.train: {train.path} holds ids of a {train.vocab_size}-token "
                         f"vocabulary but the student has {vocab_size}")
    reference = r.reference or ("stored" if r.method in ("dpo", "ipo") else "none")
    if reference == "stored" and not train.has_ref_logps:
        raise ValueError(
            f"data.train: objective.ranking.reference=stored but {train.path} has no reference "
            "log-probs; run `kdjax score … reference=STUDENT_START_DIR` and pack again, or set "
            "objective.ranking.reference=online teacher.path=STUDENT_START_DIR")
    train.seq_len = train.prompt_len + train.completion_len
    evals = open_token_store(config.data.eval) if config.data.eval else None
    eval_store = None
    if config.store.eval_path:
        eval_store = open_teacher_store(config.store.eval_path)
        eval_store.check_compatible(evals, vocab_size=vocab_size)
        check_store_temperature(eval_store, None, "store.eval_path")
    return train, evals, None, eval_store


def check_store_temperature(store, objective, key: str) -> None:
    """Refuses a top-k or sampled store whose temperature is not the one it is used at.

    Those stores hold the teacher already softened, p = softmax(z / T_store) (top-k
    log-probs or draws from it), and the kernels use it as the teacher at the objective's
    T: a store written at T = 2 and trained at T = 1 would silently distil from the wrong
    distribution (draws cannot be re-tempered). Training needs T_store = objective.
    temperature, held constant; eval (`objective=None`) reports KL at T = 1, so it needs
    T_store = 1. Dense stores hold raw logits and are tempered at use.
    """
    if store.mode not in ("topk", "sampled"):
        return
    t_store = float(store.manifest.get("temperature", 1.0))
    if objective is None:
        if t_store != 1.0:
            raise ValueError(
                f"{key}: the {store.mode} store {store.path} was written at temperature "
                f"{t_store}, but eval reports KL(teacher ‖ student) at T = 1; precompute the "
                "eval store with temperature=1.0")
        return
    t_run = float(objective.temperature)
    if objective.temperature_schedule.kind != "constant":
        raise ValueError(
            f"{key}: objective.temperature_schedule={objective.temperature_schedule.kind!r} "
            f"moves T during training, but the {store.mode} store {store.path} holds the "
            f"teacher at one temperature ({t_store}); use a constant temperature or a dense "
            "store / online teacher")
    if t_store != t_run:
        raise ValueError(
            f"{key}: the {store.mode} store {store.path} was written at temperature {t_store} "
            f"but objective.temperature={t_run}; set objective.temperature={t_store}, or "
            f"precompute the store again with temperature={t_run}")


def _fingerprints(train, store) -> dict[str, str]:
    out = {"token_store": str(train.fingerprint)}
    if store is not None:
        out["teacher_store"] = str(store.manifest.get("teacher_fingerprint"))
    return out


def make_evaluator(config: Config, mesh, state, eval_tokens, eval_store, teacher):
    """`run_eval(state) -> dict of floats` over the first `eval.batches` eval batches."""
    from kdjax.data import Loader

    if eval_tokens is None:
        return None
    bs = config.eval.batch_size or config.global_batch_size
    loader = Loader(eval_tokens, global_batch_size=bs, seed=config.seed, mesh=mesh,
                    teacher_store=None if teacher is not None else eval_store, shuffle=False)
    n = max(1, min(config.eval.batches, eval_tokens.num_rows // bs))
    fn = ev.make_eval_fn(state.graphdef, mesh, teacher=teacher,
                         store_manifest=None if teacher is not None or eval_store is None
                         else eval_store.manifest)
    return lambda st: ev.evaluate(fn, st.params["model"], st.rest,
                                  (loader.batch_at(i) for i in range(n)))


@dataclasses.dataclass
class Run:
    """Everything `train` builds before the first step."""

    mesh: Any
    train_tokens: Any
    store: Any
    state: Any
    loader: Any
    train_step: Callable
    run_eval: Callable | None
    flops: FlopCounter | None = None


def setup(config: Config) -> Run:
    """Mesh, stores, student (+ online teacher), objective, fresh state, loader, step."""
    from kdjax.data import Loader

    config.check_checkpoints()
    config.check_devices(jax.device_count())
    mesh = config.mesh.make()
    student = build_student(config, mesh)
    train_tokens, eval_tokens, store, eval_store = _open_stores(config,
                                                                student.config.vocab_size)
    teacher = (build_teacher(config.teacher.path, config.teacher.dtype, mesh,
                             config.teacher.remat) if config.teacher.path else None)
    eos = student.config.eos_token_id
    objective = config.objective.build(
        config.teacher_source, config.steps, store.manifest if store else None,
        eos_ids=tuple(() if eos is None else (eos,) if isinstance(eos, int) else eos),
        pad_id=_pad_id(student.config, train_tokens))
    # with rollout reuse each step makes k optimizer updates: schedules count updates
    k = config.objective.on_policy.updates_per_rollout if config.objective.on_policy.active \
        else 1
    tx = config.optimizer.build(config.steps * k)
    state = create_train_state(student, tx, mesh=mesh, seed=config.seed,
                               projections=objective.projection_shapes(
                                   student.config.hidden_size,
                                   _teacher_width(config, teacher, store)))
    loader = Loader(train_tokens, global_batch_size=config.global_batch_size, seed=config.seed,
                    mesh=mesh, teacher_store=store, prefetch=config.data.prefetch)
    train_step = make_train_step(objective, tx, state=state, mesh=mesh,
                                 batch_sharding=loader.sharding,
                                 micro_batches=config.micro_batches,
                                 lr_schedule=_per_step(config.optimizer.schedule(
                                     config.steps * k), k),
                                 teacher=teacher)
    run_eval = make_evaluator(config, mesh, state, eval_tokens, eval_store, teacher)
    return Run(mesh, train_tokens, store, state, loader, train_step, run_eval,
               flop_counter(student.config, train_tokens.seq_len, teacher))


def train(config: Config, *, hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Trains (or resumes) the run described by `config`; returns a summary dict.

    Returns:
      `{"run_dir", "steps", "resumed_from", "checkpoints", "final_checkpoint_step",
      "train": last window means, "eval": last eval means, "metrics_jsonl",
      "tensorboard", "curves_png", "nonfinite_skipped", "state": the final TrainState}`.
    """
    run = setup(config)
    state, run_eval = run.state, run.run_eval
    tokens_per_step = config.global_batch_size * run.train_tokens.seq_len
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(Checkpointer(config, _fingerprints(run.train_tokens,
                                                                        run.store)))
        start = ckpt.latest_step() or 0
        if start:
            state = ckpt.restore(abstract_like(state))
        logger = RunLogger(config.run_dir, config.logging, total_steps=config.steps,
                           start_step=start, flops=run.flops)
        summary = {}
        stack.callback(lambda: summary or logger.close())  # close the sinks on errors too
        stack.enter_context(run.loader)
        stack.enter_context(jax.set_mesh(run.mesh))
        batches = run.loader.iter_from(start)
        final = {}
        for step in range(start + 1, config.steps + 1):
            state, metrics = run.train_step(state, next(batches))
            logger.log_step(step, metrics, tokens=tokens_per_step)
            _check_finite(metrics, config.optimizer.max_nonfinite, step)
            for hook in hooks:
                hook(step, state, metrics)
            final = {}
            if run_eval and config.eval.every and step % config.eval.every == 0:
                with logger.paused():
                    final = run_eval(state)
                logger.log_eval(step, final)
            if ckpt.should_save(step) and step < config.steps:
                with logger.paused():
                    ckpt.save(step, state)
        if run_eval and not final:  # the last step's eval, unless the loop just ran it
            final = run_eval(state)
            logger.log_eval(config.steps, final)
        if ckpt.latest_step() != config.steps:
            ckpt.save(config.steps, state, wait=True)
        summary.update(logger.close())
        summary.update(run_dir=os.path.abspath(config.run_dir), steps=config.steps,
                       resumed_from=start or None, checkpoints=ckpt.directory,
                       final_checkpoint_step=ckpt.latest_step(), eval=final or summary["eval"],
                       nonfinite_skipped=int(state.nonfinite_total), state=state)
    return summary


def flop_counter(student_config, seq_len: int, teacher) -> FlopCounter:
    """Model FLOPs per token of the run (student 6·P + attention, + the online teacher's
    forward), from which the logger derives MFU against the chip's peak."""
    t_config = None
    if teacher is not None:
        t_config = nnx.merge(*[x for x in teacher if x is not None]).config
    return FlopCounter.from_models(student_config, seq_len, t_config)


def _per_step(schedule, k: int):
    """The learning rate a step starts with when it makes k updates."""
    return schedule if k == 1 else (lambda step: schedule(step * k))


def _pad_id(student_config, train_tokens) -> int:
    """The id of padding slots: the example store's pad id, else the student's."""
    store = getattr(train_tokens, "store", None)
    if store is not None and getattr(store, "pad_id", None) is not None:
        return int(store.pad_id)
    return int(student_config.pad_token_id or 0)


def _teacher_width(config: Config, teacher, store) -> int:
    """Hidden size of the teacher states the hidden term matches (0 when unused)."""
    if not config.objective.hidden.layer_map or config.objective.hidden.weight == 0:
        return 0
    if teacher is not None:
        return int(nnx.merge(*[x for x in teacher if x is not None]).config.hidden_size)
    return int(store.manifest["hidden_size"])


def _check_finite(metrics: dict, limit: int, step: int) -> None:
    """Stops after `limit` consecutive skipped updates (one host sync per step)."""
    streak = int(metrics["nonfinite"])
    if streak >= limit:
        raise NonFiniteError(
            f"{streak} consecutive non-finite updates (loss or gradient is NaN/inf) up to step "
            f"{step}; the last {streak} updates were skipped. Lower optimizer.lr, check the "
            "data and teacher store for NaNs, or raise optimizer.max_nonfinite.")
