"""What goes into the model besides weights: the tokenizers (`tokenizer`; `canonical`: canonical Tekken tokenisation
for constrained decoding) and images in chat messages (`images`).

Import direction (tests/test_imports.py, `LAYERS`): imports only the core (`small4_jax.errors`); no JAX model code.
"""
