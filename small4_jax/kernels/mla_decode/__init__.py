"""Absorbed MLA attention over the paged latent cache (the serving engine's attention): `api.py` chooses the
backend, `reference.py` is the definition, `xla.py` the blockwise online-softmax loop, `pallas_triton.py` the
ragged split-KV kernel."""

from small4_jax.kernels.mla_decode.api import BACKENDS, mla_attention, resolve
from small4_jax.kernels.mla_decode.pallas_triton import combine, mla_pallas, work_items
from small4_jax.kernels.mla_decode.reference import (combine_partials, gather_keys, latent_attention,
                                                     mla_reference)
from small4_jax.kernels.mla_decode.xla import mla_blockwise

__all__ = ["BACKENDS", "combine", "combine_partials", "gather_keys", "latent_attention", "mla_attention", "mla_blockwise", "mla_pallas",
           "mla_reference", "resolve", "work_items"]
