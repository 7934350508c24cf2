"""Quantised weights: the storage formats and their math (`formats`: `QArray`, fp8 / int8 / int4, GPTQ) and calibrated
int4 over a whole model (`calibration`).

Import direction: `formats` is a leaf over the core, below `kernels` and `nn` (which compute on its arrays);
`calibration` runs a model layer by layer and sits above `nn` and `ckpt`.
"""
