"""The model math in Flax NNX: the decoder (`model`), routing and routed-expert dispatch (`moe`), the vision encoder
and projector (`vision`), the paged-cache forward the serving engine runs (`paged`), the EAGLE draft head (`eagle`).

Import direction: imports the core, `parallel`, `quant.formats` and `kernels`; never checkpoints, adapters,
decoding drivers or `infer`.
"""
