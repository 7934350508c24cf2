"""Decoding on the library side: the one per-row sampler (`sampler`), and the Python API's `generate`
(`generation`, `sampling`).

Import direction: imports the core, `nn` and `inputs`; `infer` builds on it.
"""
