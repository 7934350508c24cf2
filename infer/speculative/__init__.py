"""Speculative decoding: the decoder that drafts and verifies through the engine's step API, with the n-gram
drafter (`decoder`), and the EAGLE drafter on its own paged cache (`eagle_drafter`).

Import direction (tests/test_imports.py, `INFER_ORDER`): imports `infer.engine`, `infer.structured` and
`small4_jax`; the engine does not import it (a `SpeculativeConfig` builds the engine's speculator).
"""
