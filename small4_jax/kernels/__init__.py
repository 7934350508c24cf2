"""Custom kernels. One folder per op, laid out as reference + backends + one shared test suite:

    gmm/reference.py      the op in plain jax.numpy (dense, masked): the definition every backend is tested against
    gmm/pallas_triton.py  the Pallas kernels (Triton backend; Pallas interpret mode on CPU)
    gmm/metadata.py       tile-to-group bookkeeping computed on device (no host synchronisation)
    gmm/tiling.py         block sizes, picked from static shapes (decode vs prefill)
    gmm/api.py            the public functions: backend choice and the custom VJP
    tests/test_gmm_kernel.py  the one test suite, run against every backend

`gmm` is the grouped matmul of the routed experts (rows sorted by expert); `tgmm` is its weight gradient.
`mla_decode` is absorbed MLA attention over the paged latent cache (the serving engine's attention).
"""

from small4_jax.kernels.gmm import GmmTiling, gmm, gmm_reference, gmm_tiling, tgmm, tgmm_reference
from small4_jax.kernels.gmm import self_check as gmm_self_check

__all__ = ["GmmTiling", "gmm", "gmm_reference", "gmm_self_check", "gmm_tiling", "tgmm", "tgmm_reference"]
