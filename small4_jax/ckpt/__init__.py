"""Checkpoints: HF / Mistral-native safetensors read one tensor at a time (`safetensors_io`), the plan mapping a
model's parameters to checkpoint tensors (`plan`), a checkpoint directory into a model (`load`: `from_pretrained`),
sharded Orbax checkpoints written tensor by tensor and loaded onto any mesh (`sharded`), EAGLE draft heads (`eagle`).

Import direction (tests/test_imports.py, `LAYERS`): imports the core, `parallel`, `quant`, `nn` and `lora`;
`decode`, `tools`, `infer` and `train` import it. `safetensors_io` is a leaf over the core (LoRA reads PEFT files
with it).
"""
