"""Parsing settings is cheap: no JAX, no disk but the YAML; the names it checks against
(`kdjax.catalog`, `kdjax.models.config`) are the ones the code that runs them uses."""

import dataclasses
import inspect
import subprocess
import sys

from kdjax import catalog

PARSE_ONLY = """
import sys
from kdjax.train.config import load_config
config = load_config('configs/quickstart.yaml', ['model.init=null', 'model.path=/no/such/dir'])
from kdjax.teacher.config import PrecomputeConfig
PrecomputeConfig.load('configs/precompute/quickstart_sampled.yaml')
from kdjax.schema import settings_help
settings_help(type(config))
loaded = sorted(m for m in sys.modules if m.startswith(('jax', 'flax', 'optax', 'orbax')))
assert not loaded, loaded
"""


def test_parsing_imports_no_jax_and_reads_no_checkpoint():
    root = inspect.getfile(catalog).rsplit("/kdjax/", 1)[0]
    subprocess.run([sys.executable, "-c", PARSE_ONLY], cwd=root, check=True)


def test_divergence_catalog_is_the_losses_signatures():
    import kdjax.losses as losses

    assert tuple(catalog.DIVERGENCES) == tuple(losses.DIVERGENCES)
    for name, kwargs in catalog.DIVERGENCES.items():
        params = inspect.signature(getattr(losses, name)).parameters
        real = {n: (catalog.REQUIRED if p.default is p.empty else p.default)
                for n, p in params.items()
                if p.kind is p.KEYWORD_ONLY and n != "temperature"}
        assert real == kwargs, name


def test_hidden_losses_exist():
    import kdjax.losses as losses

    assert all(callable(getattr(losses, f"hidden_{n}")) for n in catalog.HIDDEN_LOSSES)


def test_store_modes_are_the_signals_a_store_holds():
    from kdjax.teacher.signal import MODES

    assert catalog.STORE_MODES == MODES
    assert set(catalog.SPARSE_STORE_MODES) < set(MODES)


def test_model_names_are_the_decoders():
    from kdjax.models.blocks import REMAT
    from kdjax.models.config import REMAT_POLICIES

    assert {"none", *REMAT} == set(REMAT_POLICIES)  # "none": no jax.checkpoint at all


def test_objective_defaults_are_the_configs():
    """One name and one default per setting: the Objective a run builds from a default
    config equals the default Objective (but for what the config decides: the source)."""
    from kdjax.train.config import ObjectiveConfig
    from kdjax.train.objective import Objective

    built = ObjectiveConfig().build("store", total_steps=10)
    assert built == Objective()
    assert {f.name for f in dataclasses.fields(Objective)} >= {"t2_scaling", "divergence"}
