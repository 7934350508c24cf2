"""The serving engine: continuous batching over the paged latent cache (`engine`), its pages and prefix cache
(`page_pool`). Speculative decoding drives it through its step API (`Engine.padded_rows`, `page_table`, `to_shards`,
`row_sampling`, `accept`, ...) without the engine importing it.

Import direction (tests/test_imports.py, `LAYERS`, `INFER_ORDER`): imports `small4_jax` and `infer.structured`;
never `infer.speculative`, `infer.server` or the command-line modules.
"""
