"""Teacher-generated data: `kdjax generate` (labeling, expansion), curation filters and
the generated dataset they write (see docs/architecture.md)."""
