"""Decoding: the one per-row sampler (`sampler`), and the Python API's `generate` (`generation`, `sampling`).

Import direction (tests/test_imports.py, `LAYERS`): `sampler` is a leaf (the paged steps of `nn.paged` sample with
it); `generation` and `sampling` sit above `nn` and `ckpt`. `infer` builds on them.
"""
