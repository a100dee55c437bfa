"""The command-line shape shared by the config-driven commands (`kdjax precompute`,
`kdjax generate`): `--config FILE`, a few flags that set settings of the same name,
`--overwrite`, the multi-process flags and trailing `key=value` overrides."""

from __future__ import annotations

import argparse

from kdjax.distributed import add_distributed_args


def add_config_args(p: argparse.ArgumentParser, flags: dict[str, str | dict], *,
                    example: str, config_help: str = "YAML file of the settings below",
                    overwrite_help: str = "replace an existing output written with other "
                    "settings") -> None:
    """--config, one `--NAME` per `flags` entry (name → its help, or add_argument keywords),
    --overwrite, the distributed flags and the `key=value` overrides (`example` shows
    some)."""
    p.add_argument("--config", help=config_help)
    for name, spec in flags.items():
        p.add_argument(f"--{name}", **({"help": spec} if isinstance(spec, str) else spec))
    p.add_argument("--overwrite", action="store_true", default=None, help=overwrite_help)
    add_distributed_args(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"any setting below, e.g. {example} (values are YAML)")


def config_overrides(args: argparse.Namespace, names) -> list[str]:
    """The trailing overrides, then `name=value` for each flag in `names` that was given
    (flags win over the file and the overrides)."""
    out = list(args.overrides)
    out += [f"{k}={getattr(args, k)}" for k in names if getattr(args, k) is not None]
    return out
