"""Feedback: `kdjax score` has a teacher score K candidates per prompt (its likelihood, or
its expected grade as a judge) and writes a preference dataset for the ranking objective."""

from kdjax.score.config import JudgeConfig, ScoreConfig
from kdjax.score.dataset import PreferenceDataset, PreferenceWriter
from kdjax.score.pairs import make_pairs, rank_of
from kdjax.score.run import run_score

__all__ = ["JudgeConfig", "PreferenceDataset", "PreferenceWriter", "ScoreConfig",
           "make_pairs", "rank_of", "run_score"]
