"""From a training config and a list of devices to the shared `steps.Plan`.

Resolves, without reading weights or data: the mesh (the config's mesh section over the
given devices), the row length, the student (and online teacher) architectures, the
teacher store's manifest (real when on this machine, else synthetic), and the precompute
settings (`PrecomputeConfig` defaults, then the run's, then `--precompute key=value`).
"""

from __future__ import annotations

from collections.abc import Sequence

from kdjax.compile import abstract as ab
from kdjax.compile.steps import Plan


def precompute_config(config, overrides: Sequence[str] = (), teacher: str | None = None):
    """The `PrecomputeConfig` the precompute step (and a synthetic store) is built from:
    the run's store mode, global batch and hidden layers, then `key=value` overrides
    (read as `kdjax precompute` reads its own)."""
    from kdjax import schema
    from kdjax.teacher.config import PrecomputeConfig

    values = {"batch_size": config.global_batch_size}
    if config.store.mode:
        values["mode"] = config.store.mode
    hidden = config.objective.hidden
    if hidden.weight > 0 and not config.teacher.path:
        values["hidden_layers"] = sorted({int(t) for t in hidden.layer_map.values()})
    if teacher:
        values["teacher"] = teacher
    return schema.load(PrecomputeConfig, None, overrides, base=values)


def student_config(config):
    """`(DecoderConfig, source)` of the run's student with its dtypes and remat."""
    m = config.model
    if m.init is not None:
        return m.decoder_config(), "model.init"
    return ab.decoder_config(m.path, **m.overrides())


def make_plan(config, devices, *, precompute: Sequence[str] = (),
              teacher: str | None = None) -> Plan:
    """The `Plan` of `config` on `devices` (e.g. a TPU topology's devices).

    Args:
      config: a `kdjax.train.config.Config`.
      devices: the devices to compile for.
      precompute: `key=value` PrecomputeConfig overrides (k, num_samples, num_slots,
        batch_size, mesh, dtype, hidden_layers, …).
      teacher: teacher directory of the precompute step (default: `teacher.path`).

    Raises:
      ConfigError / ValueError / FileNotFoundError with what to change.
    """
    devices = list(devices)
    config.check_devices(len(devices))
    mesh = config.mesh.make(devices=devices)
    seq_len = ab.seq_len_of(config)
    s_cfg, s_source = student_config(config)
    notes = [f"student: {s_source}"]
    student = ab.abstract_model(s_cfg, mesh, source=s_source, f32_params=True)
    online = None
    if config.teacher.path:
        t = config.teacher
        t_cfg, t_source = ab.decoder_config(t.path, dtype=t.dtype, param_dtype=t.dtype,
                                            remat=t.remat)
        online = ab.abstract_model(t_cfg, mesh, source=t_source)
        notes.append(f"online teacher: {t_source}")
    pc = precompute_config(config, precompute, teacher or config.teacher.path)
    manifest = None
    if config.store.path:
        vocab = s_cfg.vocab_size
        hidden = 0
        if pc.teacher:
            t_cfg, _ = ab.decoder_config(pc.teacher)
            vocab, hidden = t_cfg.vocab_size, t_cfg.hidden_size
        manifest = ab.store_manifest(config.store.path, config.store.mode, seq_len=seq_len,
                                     vocab_size=vocab, precompute=pc, hidden_size=hidden)
        if manifest.get("synthetic"):
            sizes = {k: manifest[k] for k in ("k", "num_samples", "num_slots")
                     if manifest.get(k)}
            notes.append(f"teacher store {config.store.path} is not on this machine: "
                         f"synthetic {manifest['mode']} store {sizes} (--precompute k=… "
                         "num_samples=… num_slots=… to change)")
    return Plan(config=config, devices=devices, mesh=mesh, seq_len=seq_len, student=student,
                teacher=online, manifest=manifest, precompute=pc, notes=notes)
