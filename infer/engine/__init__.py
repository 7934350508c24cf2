"""The serving engine: continuous batching over the paged latent cache (`engine`), its pages and prefix cache
(`page_pool`).

Import direction: imports `small4_jax` and `infer.structured`; never `infer.server` or the command-line modules.
"""
