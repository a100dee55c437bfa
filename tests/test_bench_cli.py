"""`kdjax bench`: benchmark scripts are loaded only for `kdjax bench AREA`, every area in
AREAS follows the protocol, and a missing or broken area is an error, never absent."""

from __future__ import annotations

import sys

import pytest

from kdjax import bench, cli


def _bench_modules():
    return sorted(m for m in sys.modules if m.startswith("kdjax_bench_"))


def test_cli_parser_and_help_load_no_benchmark(monkeypatch, capsys):
    def refuse(area):
        raise AssertionError(f"benchmarks/{area}.py loaded outside `kdjax bench {area}`")

    monkeypatch.setattr(bench, "load", refuse)
    before = _bench_modules()
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--help"])
    assert exit_.value.code == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(area in out for area in bench.AREAS)  # every area is listed
    # a parsed `kdjax bench AREA ...` has loaded nothing yet either
    args, extra = parser.parse_known_args(["bench", "train", "--quick", "--repeats", "2"])
    assert (args.area, args.bench_argv, extra) == ("train", ["--quick", "--repeats", "2"], [])
    assert _bench_modules() == before


@pytest.mark.parametrize("area", sorted(bench.AREAS))
def test_every_area_follows_the_protocol(area):
    module = bench.load(area)
    assert callable(module.build_parser) and callable(module.run)
    parser = module.build_parser()
    assert parser.parse_args([]) is not None  # the defaults parse


def test_bench_train_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kdjax bench train") and "--quick" in out


def test_missing_or_broken_area_is_an_error(monkeypatch, tmp_path, capsys):
    (tmp_path / "broken.py").write_text('"""No build_parser, no run."""\n')
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path)
    monkeypatch.setitem(bench.AREAS, "broken", "a script without the protocol")
    monkeypatch.setitem(bench.AREAS, "gone", "a script that does not exist")
    for area, says in (("broken", "does not follow"), ("gone", "has no script")):
        assert cli.main(["bench", area]) == cli.EXIT_USAGE
        assert says in capsys.readouterr().err
