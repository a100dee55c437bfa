"""kdjax.storage."""
