"""Where arrays live: the logical axes of every parameter and the one table mapping them to mesh axes (`sharding`),
placing a model built in memory on a mesh (`placement`), multi-process start-up and preflight (`distributed`).

Import direction (tests/test_imports.py, `LAYERS`): imports only the core (`small4_jax.errors`, `config`,
`platform`); the rest of the package imports it.
"""
