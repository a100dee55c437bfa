"""kdjax.data: datasets → tokenize → pack → token store, and the step-indexed loader."""

from kdjax.data.build import build_token_store
from kdjax.data.examples import ExampleStore, build_example_store, open_example_store
from kdjax.data.loader import Loader
from kdjax.data.pack import derive_targets_positions, fill_rows, plan_packing
from kdjax.data.sources import load_source
from kdjax.data.token_store import TokenStore, open_token_store
from kdjax.data.tokenize import Fields, encode_chat, tokenize_dataset, tokenizer_fingerprint

__all__ = [
    "ExampleStore", "Fields", "Loader", "TokenStore", "build_example_store",
    "build_token_store", "derive_targets_positions", "encode_chat", "fill_rows",
    "load_source", "open_example_store", "open_token_store", "plan_packing",
    "tokenize_dataset", "tokenizer_fingerprint",
]
