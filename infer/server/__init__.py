"""The HTTP server's pieces: the engine run in lockstep on every process of a multi-host server (`lockstep`).

Import direction: imports `infer.engine`, `infer.chat`, `infer.structured` and `small4_jax`; only `infer.serve`
imports it.
"""
