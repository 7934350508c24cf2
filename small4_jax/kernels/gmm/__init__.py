"""Grouped matmul over rows sorted by group (the routed experts' matmul): see `api.py` for the functions and their
backends, `reference.py` for the definition, `pallas_triton.py` for the kernels."""

from small4_jax.kernels.gmm.api import BACKENDS, default_interpret, gmm, self_check, tgmm
from small4_jax.kernels.gmm.metadata import GroupMetadata, make_group_metadata
from small4_jax.kernels.gmm.reference import gmm_reference, row_groups, tgmm_reference
from small4_jax.kernels.gmm.tiling import GmmTiling, gmm_tiling, is_decode, tgmm_tiling

__all__ = [
    "BACKENDS",
    "GmmTiling",
    "GroupMetadata",
    "default_interpret",
    "gmm",
    "gmm_reference",
    "gmm_tiling",
    "is_decode",
    "make_group_metadata",
    "row_groups",
    "self_check",
    "tgmm",
    "tgmm_reference",
]
