"""Programs around the library: deviceless GPU compiles (`aot`) of the programs users run (`aot_programs`), and
streaming checkpoint conversion (`convert`).

Import direction: the top layer: may import anything in `small4_jax` (and `train`, whose step `aot_programs`
compiles); only tests, benchmarks and the command line import it.
"""
