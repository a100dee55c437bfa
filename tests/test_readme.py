"""The README's Python examples run as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:  # later blocks build on earlier ones, as a reader would
        exec(compile(block, str(README), "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
    assert namespace["per_token"].shape == (4, 128)
    assert set(namespace["metrics"]) >= {"divergence", "ce"}
