"""Checkpoints of a run (orbax): save, keep the newest N, resume on any mesh.

Layout under `<run_dir>/checkpoints/<step>/`:
  state/   the train-state pytree (student params, optimizer state, step, RNG key), as
           sharded arrays (`ocp.args.StandardSave`); the teacher is never part of it.
  config/  JSON `{"yaml": <resolved config YAML>, "fingerprint": sha256}`.
  meta/    JSON `{"step": int, "fingerprints": {"token_store": …, "teacher_store": …}}`.

Orbax writes each step into a temporary directory and renames it when every item is
complete (after writing `commit_success.txt`), so a save killed half-way is a stale
`<step>.orbax-checkpoint-tmp-*` directory that is never listed as a step; it is removed
the next time the run directory is opened.

Resume: `restore(abstract_state)` reads the newest step into the shardings of
`abstract_state` (a pytree of `jax.ShapeDtypeStruct` with `.sharding`, e.g. from
`abstract_like(state)` or `jax.eval_shape`), so a run saved on one mesh layout resumes on
another. It first compares the saved config and data fingerprints with the current run
and refuses an incompatible resume with a message naming each difference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml

from kdjax import schema
from kdjax.train.config import Config

__all__ = ["RESUMABLE_CHANGES", "Checkpointer", "ResumeError", "abstract_like", "restore_student",
           "student_decoder_config",
           "config_differences", "read_run_config", "write_run_config"]

# Config keys that may change between a run and its resume: where things are written,
# how often, on which devices, and how long to train. The data section (paths, packing
# settings) and store paths are free to change because the token/teacher store
# fingerprints, checked separately, pin what is actually read.
RESUMABLE_CHANGES = ("run_dir", "steps", "mesh.", "checkpoint.", "eval.", "logging.",
                     "data.", "store.path", "store.eval_path", "model.remat",
                     "teacher.remat", "optimizer.max_nonfinite")


class ResumeError(ValueError):
    """The checkpoint in a run directory does not belong to this config or data."""


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct` (with the same sharding) for every array leaf of `tree`."""
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(leaf, tree)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping) and data:
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def config_differences(saved: Mapping, current: Mapping) -> list[str]:
    """Dotted keys whose values differ and may not change on resume, as `key: old → new`."""
    old, new = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        default, known = schema.field_default(Config, key)
        if key not in new and not known:
            continue  # a field this version of kdjax no longer has
        if key not in old and known and new[key] == default:
            continue  # a field added since the run started, at its default
        if any(key == allowed or (allowed.endswith(".") and key.startswith(allowed))
               for allowed in RESUMABLE_CHANGES):
            continue
        out.append(f"{key}: {old.get(key, '<unset>')!r} → {new.get(key, '<unset>')!r}")
    return out


def read_run_config(run_dir: str | os.PathLike) -> Config:
    """The resolved config a run wrote to `<run_dir>/config.yaml`."""
    from kdjax.train.config import load_config

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is {str(run_dir)!r} a kdjax run "
                                "directory? (`kdjax train` writes it)")
    return load_config(path, [])


class Checkpointer:
    """Saves and restores a run's train state with orbax (async, keep-last-N).

    Args:
      config: the run's config; `config.run_dir`, `config.checkpoint.{every,keep,
        async_save}` are used, and the whole config is saved with each step.
      fingerprints: names → fingerprints of what the run reads (token store, teacher
        store, tokenizer, …); a resume with any different value is refused.
      read_only: open an existing run for reading (eval, export): nothing is created,
        saved or cleaned up.
    """

    def __init__(self, config: Config, fingerprints: Mapping[str, str] | None = None, *,
                 read_only: bool = False):
        self.config = config
        self.fingerprints = dict(fingerprints or {})
        self.directory = os.path.abspath(os.path.join(config.run_dir, "checkpoints"))
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"{self.directory} does not exist: the run has no "
                                    "checkpoints yet")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else config.checkpoint.keep,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=config.checkpoint.async_save,
            # a killed save leaves a tmp dir; a writer drops it, a reader leaves it alone
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        if read_only:  # orbax warns that the directory is read-only: that is the point
            absl_log.setLevel(logging.ERROR)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl_log.setLevel(level)

    # ---- queries
    def latest_step(self) -> int | None:
        """The newest complete (committed) step, or None for a fresh run directory."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True on multiples of `checkpoint.every` (and never for every = 0)."""
        every = self.config.checkpoint.every
        return every > 0 and step % every == 0

    # ---- save / restore
    def save(self, step: int, state: Any, *, wait: bool = False) -> None:
        """Starts saving `state` at `step` (returns before the write ends when async) and
        refreshes `<run_dir>/config.yaml`."""
        if jax.process_index() == 0:
            write_run_config(self.config)
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave({"yaml": self.config.to_yaml(),
                                      "fingerprint": self.config.fingerprint()}),
            meta=ocp.args.JsonSave({"step": int(step), "fingerprints": self.fingerprints}),
        ), force=True)
        if wait:
            self.wait()

    def check_resume(self, step: int | None = None, *, data: bool = True) -> int:
        """Raises ResumeError unless checkpoint `step` (default newest) matches this run:
        the config (up to RESUMABLE_CHANGES) and, with `data`, the fingerprints. Returns
        the step. `data=False` is the cheap early check, before the stores are opened."""
        step = self._step_or_latest(step)
        saved = self._manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        problems = [] if not data else [
            f"data fingerprint {name}: {saved.meta['fingerprints'].get(name)!r} → {value!r}"
            for name, value in sorted(self._fingerprint_changes(
                saved.meta["fingerprints"]).items())]
        saved_config = yaml.safe_load(saved.config["yaml"])
        problems += config_differences(saved_config, self.config.to_dict())
        if problems:
            raise ResumeError(
                f"cannot resume {self.directory} at step {step}: the run was started with a "
                "different config or data:\n  " + "\n  ".join(problems) + "\nUse a new "
                "run_dir, or restore these values (the saved config is "
                f"{os.path.join(self.config.run_dir, 'config.yaml')}).")
        return step

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """The saved state at `step` (default newest), placed with the shardings of
        `abstract_state` (pytree of `jax.ShapeDtypeStruct` with `.sharding`)."""
        step = self.check_resume(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored.state

    def wait(self) -> None:
        """Blocks until any async save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers
    def _step_or_latest(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available: {self.all_steps()}")
        return step

    def _fingerprint_changes(self, saved: Mapping[str, str]) -> dict[str, str | None]:
        names = set(saved) | set(self.fingerprints)
        return {n: self.fingerprints.get(n) for n in names
                if saved.get(n) != self.fingerprints.get(n)}


def write_run_config(config: Config) -> str:
    """Writes the resolved config to `<run_dir>/config.yaml` (atomically); returns the path."""
    os.makedirs(config.run_dir, exist_ok=True)
    path = os.path.join(config.run_dir, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_yaml())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path



def student_decoder_config(config: Config):
    """The student's `DecoderConfig`: `model.init`, or the checkpoint's config at
    `model.path` (HF directory or `.gguf`), or the teacher's at `model.init_from` with
    len(keep_layers) layers; with the run's dtypes."""
    m = config.model
    if m.init is not None:
        return m.decoder_config()
    from pathlib import Path

    from transformers import AutoConfig

    from kdjax.models import DecoderConfig

    path = Path(m.path or m.init_from)
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        from kdjax.models.gguf import load_hf_config

        hf_config = load_hf_config(path)
    else:
        hf_config = AutoConfig.from_pretrained(path)
    layers = {} if m.keep_layers is None else {"num_layers": len(m.keep_layers)}
    return DecoderConfig.from_hf(hf_config, dtype=m.dtype, param_dtype=m.param_dtype,
                                 **layers)


def restore_student(config: Config, step: int | None = None):
    """The student `Decoder` of a run's checkpoint (`params["model"]` of the saved train
    state; the optimizer state, projections and teacher are not read), on the default
    device, and the step it came from. Used by `kdjax export` and `kdjax eval`."""
    import jax.numpy as jnp
    from flax import nnx

    from kdjax.models import Decoder

    ckpt = Checkpointer(config, read_only=True)
    try:
        step = ckpt._step_or_latest(step)
        cfg = student_decoder_config(config)
        # Shapes only: the weights come from the checkpoint, so nothing is initialized
        # (unless the module has non-parameter state, which must then be real).
        graphdef, params, rest = nnx.split(
            nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
        if jax.tree.leaves(rest):
            graphdef, params, rest = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                nnx.to_pure_dict(params))
        item = {"params": {"model": abstract}}
        restored = ckpt._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True)))
    finally:
        ckpt.close()
    values = jax.tree.map(jnp.asarray, restored.state["params"]["model"])
    nnx.replace_by_pure_dict(params, values)
    return nnx.merge(graphdef, params, rest), step
