"""`kdjax quickstart`: the whole pipeline in its tiny size, the grammar, and the CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np

from kdjax import quickstart


def test_tiny_quickstart_writes_report_table_and_plot(tmp_path):
    # the real command, in a fresh process on one CPU device (as a user runs it)
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "kdjax.cli", "quickstart", "--out",
                           str(tmp_path / "qs"), "--size", "tiny"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| distilled |" in proc.stdout and "report.md" in proc.stdout
    report = json.loads((tmp_path / "qs" / "report.json").read_text())
    r = report["results"]
    assert set(r) == {"teacher", "distilled", "baseline"}
    for name, m in r.items():
        assert all(math.isfinite(v) for v in m.values()), name
        assert abs(m["perplexity"] - math.exp(m["ce"])) < 1e-6 * m["perplexity"]
    assert abs(r["teacher"]["kl_teacher"]) < 1e-5 and r["teacher"]["top1_agreement"] == 1.0
    assert r["distilled"]["kl_teacher"] > 0 and 0 <= r["baseline"]["top1_agreement"] <= 1
    out = tmp_path / "qs"
    text = (out / "report.md").read_text()
    assert "| distilled |" in text and "| baseline |" in text
    assert (out / "quickstart.png").stat().st_size > 0
    assert (out / "teacher" / "hf" / "config.json").exists()
    assert report["phase_seconds"].keys() == {"data", "teacher", "precompute", "distilled",
                                              "baseline", "eval"}


def test_grammar_is_fixed_and_documents_follow_the_seed():
    a, b = quickstart.Grammar(), quickstart.Grammar()
    assert all(np.array_equal(a.tables[k], b.tables[k]) for k in a.tables)
    docs = [a.document(np.random.default_rng(s)) for s in (0, 0, 1)]
    assert docs[0] == docs[1] != docs[2]
    words = {w for d in (a.document(np.random.default_rng(i)) for i in range(50))
             for w in d.split()}
    vocab = {w for ws in quickstart._WORDS.values() for p in ws for w in p.split()}
    assert words <= vocab | {"the", "a", "in", "and", "saw", "near", "."}


def test_cli_registers_quickstart():
    from kdjax.cli import build_parser

    args = build_parser().parse_args(["quickstart", "--out", "x", "--seed", "3"])
    assert args.func is quickstart.main and args.seed == 3 and args.size == "default"
