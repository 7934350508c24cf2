"""Checkpoints: HF / Mistral-native safetensors read one tensor at a time (`safetensors_io`), a checkpoint directory
into a model (`load`: `from_pretrained`), sharded Orbax checkpoints written tensor by tensor and loaded onto any
mesh (`sharded`).

Import direction: imports the core, `parallel`, `quant`, `nn` and `lora`; `tools`, `infer` and `train` import it.
"""
