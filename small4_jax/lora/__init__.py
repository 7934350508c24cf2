"""LoRA adapters: attached to one model, trained, merged and exported (`adapters`); many adapters served side by
side, chosen per batch row (`multi`).

Import direction (tests/test_imports.py, `LAYERS`): imports the core, `parallel`, `quant.formats` and `nn`;
`ckpt`, `decode`, `infer` and `train` import it.
"""
