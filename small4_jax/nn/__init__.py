"""The model math in Flax NNX: shared building blocks (`layers`), routing, the stacked experts and their dispatch
(`moe`), linears with quantised kernels (`qlinear`), the decoder (`model`), the vision encoder and projector
(`vision`), the paged-cache forward and steps the serving engine runs (`paged`), the EAGLE draft head (`eagle`).

Import direction (tests/test_imports.py, `LAYERS`): imports the core, `parallel`, `quant.formats`,
`decode.sampler` and `kernels`; never checkpoints, adapters, the Python API's decoding or `infer`.
"""
