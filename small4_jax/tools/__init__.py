"""Programs around the library: deviceless GPU compiles (`aot`) of the programs users run (`aot_programs`), and
streaming checkpoint conversion (`convert`).

Import direction (tests/test_imports.py, `LAYERS`): the top layer: may import anything in `small4_jax`, `train`
(whose step `aot_programs` compiles) and `infer`; only tests, benchmarks and the command line import it.
"""
