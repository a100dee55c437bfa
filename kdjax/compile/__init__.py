"""kdjax.compile: ahead-of-time compilation of a config's real steps for a TPU topology or
N devices, and what the compiled per-device program holds (`kdjax compile`).

Modules (one concept each): `hlo` parses compiled HLO (collectives, dot FLOPs, HBM
traffic, loop trip counts); `chips` the per-chip ceilings; `flops` model FLOPs;
`presets` architectures of well-known checkpoints; `abstract` sharded abstract inputs;
`plan` / `steps` the train, eval and precompute steps lowered on them; `target` the
devices; `report` compile + analysis + fit; `render` the text form; `cli` the command.
Nothing is imported here, so `kdjax.compile.hlo` stays cheap to import in tests.
"""
