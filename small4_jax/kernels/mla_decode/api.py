"""`mla_attention`: absorbed MLA attention over the paged latent cache, with the backend chosen statically.

    "xla"        xla.mla_blockwise: online softmax over blocks of pages (any platform; CPU serving, the default off GPUs)
    "pallas"     pallas_triton.mla_pallas: the ragged split-KV kernel (GPUs; interpret mode elsewhere, for tests)
    "reference"  reference.mla_reference: every score materialised (tests)
    "auto"       "pallas" on GPUs when the kernel takes the shapes, else "xla"

The platform is that of the cache (`small4_jax.platform.platform_of`: its mesh, the context mesh, the default device),
so a CPU host lowering for GPU devices (`small4_jax.tools.aot`) gets the compiled kernel, not the CPU choice.
"""

from __future__ import annotations

from small4_jax.kernels.mla_decode import pallas_triton
from small4_jax.kernels.mla_decode.reference import mla_reference
from small4_jax.kernels.mla_decode.xla import mla_blockwise
from small4_jax.platform import on_gpu

BACKENDS = ("auto", "xla", "pallas", "reference")


def resolve(impl: str, q_lat_shape, q_pe_shape, page_size: int, *placed) -> str:
    """The backend `impl` means for these shapes on the platform of `placed` ("auto" -> "pallas" on GPUs where the
    kernel fits: power-of-two dims and pages of at least 16 tokens, Triton's smallest dot)."""
    if impl not in BACKENDS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {BACKENDS}")
    if impl == "auto":
        ok, _ = pallas_triton.supports(q_lat_shape, q_pe_shape, page_size)
        return "pallas" if on_gpu(*placed) and ok and page_size >= 16 else "xla"
    return impl


def mla_attention(q_lat, q_pe, pages, layer, page_table, seq_index, scale, *, impl: str = "auto",
                  kv_splits: int | None = None, interpret: bool | None = None, return_lse: bool = False):
    """The attended latent [B, T, nh, R] (fp32) of queries q_lat [B, T, nh, R] / q_pe [B, T, nh, r] over rows of
    pages [L, P, page, R + r] at `layer` listed by page_table [B, W]; key k is visible to token (b, t) when
    k <= seq_index[b, t]; scale [B, T] multiplies the fp32 scores.

    kv_splits: split-KV work items beyond one per row for the kernel (default: 64 for steps of up to 8 tokens per
    row, decode and speculative verify; none for prefill chunks, whose query blocks already fill the GPU).
    return_lse: return (latent, its log-sum-exp [B, T, nh]): the partial result of one shard of a context-parallel
    cache (seq_index -1 where none of the shard's keys is visible: 0 and -inf), merged by `combine_partials`.
    """
    impl = resolve(impl, q_lat.shape, q_pe.shape, pages.shape[2], pages)
    if impl == "reference":
        return mla_reference(q_lat, q_pe, pages, layer, page_table, seq_index, scale, return_lse)
    if impl == "xla":
        return mla_blockwise(q_lat, q_pe, pages, layer, page_table, seq_index, scale, return_lse=return_lse)
    ok, why = pallas_triton.supports(q_lat.shape, q_pe.shape, pages.shape[2])
    if not ok:
        raise ValueError(f"the MLA kernel cannot take these shapes: {why}; use impl='xla'")
    if kv_splits is None:
        kv_splits = 64 if q_lat.shape[1] <= 8 else 0
    if interpret is None:
        interpret = not on_gpu(pages)
    return pallas_triton.mla_pallas(q_lat, q_pe, pages, layer, page_table, seq_index, scale, kv_splits=kv_splits,
                                    interpret=interpret, return_lse=return_lse)
