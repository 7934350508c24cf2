"""Quantised weights: the storage formats and their math (`formats`: `QArray`, fp8 / int8 / int4, GPTQ on one
weight) and calibrated int4 over a whole model, one decoder layer at a time (`calibration`).

Import direction (tests/test_imports.py, `LAYERS`): `formats` is a leaf over the core, below `kernels` and `nn`
(which compute on its arrays); `calibration` runs a model's layers, so it sits above `nn` and below `ckpt`.
"""
