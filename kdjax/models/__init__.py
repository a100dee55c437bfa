"""kdjax.models."""
