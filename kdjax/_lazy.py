"""Package attributes imported on first use (PEP 562), so importing a package for its
JAX-free parts (configs) does not import JAX."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """`(__getattr__, __dir__)` for a package whose public name `n` lives in submodule
    `exports[n]`; assign both at the package's top level."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{exports[name]}")
        value = getattr(module, name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__():
        return sorted({*vars(importlib.import_module(package)), *exports})

    return __getattr__, __dir__
