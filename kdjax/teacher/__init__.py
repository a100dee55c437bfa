"""kdjax.teacher."""
