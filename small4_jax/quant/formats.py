"""Quantised weights: fp8 e4m3 (checkpoint scales kept), int8 per output channel, int4 in groups of 128 along K.

One representation, `QArray(values, scale)`, for a dense kernel [K, N] and for stacked experts [E, K, N]:

    values  fp8 e4m3   [..., K, N]      the checkpoint's bytes, never widened on host or device
            int8       [..., K, N]      q = round(w / s), |q| <= 127
            uint8      [..., K/2, N]    int4 packed two per byte (below), q in [-8, 7] stored as q + 8
    scale   float32    [..., Kb, Nb]    a block grid: the block of rows K/Kb x columns N/Nb shares scale[kb, nb]
            (bfloat16 for int4, where one scale per 128 weights would otherwise add 6% to the bytes)

    W[..., k, n] = q[..., k, n] * scale[..., k // (K/Kb), n // (N/Nb)]

So fp8 per tensor is a [1, 1] grid ([E, 1, 1] per expert, the release's `weight_scale_inv`), a Mistral-native fused
gate_up whose w1 and w3 carry separate scales is [E, 1, 2] (one per half), int8 per channel is [1, N], int4 with
group g is [K/g, N], and a block-quantised FP8 checkpoint is its own grid. The format is known from the values'
dtype alone (`format_of`); the group size from the shapes.

int4 scales: per group column, the MSE-optimal scale over a clipping grid with the extreme on the 8-level side
(`int4_scale`; a scale may be negative), rounded to bfloat16 before the values are rounded against it, so the
dequantised weight is exactly q * scale. With calibration data (`calibration.py`) GPTQ chooses the values
(`gptq_int4`), and the scale search weighs each input row by its Hessian diagonal.

int4 packing: within each group of g rows along K, byte row j (0 <= j < g/2) holds row j in its low nibble and row
j + g/2 in its high nibble. A kernel tile of rows that lies in one half of one group therefore reads contiguous
bytes and one nibble (`gmm_quant` in kernels/gmm), and no interleave is needed.

Which weights: every projection of attention, the dense and shared MLPs and the routed experts. Never the
embeddings, lm_head, norms or router (ARCHITECTURE.md §4; the vision tower is not part of the text model).
`quantize=` names a per-part `Policy` (`POLICIES`): "fp8" and "int8" everywhere, "int4" the routed experts in int4
and the dense linears in int8 per channel (the default int4: the dense linears carry most of int4's error), and
"int4-all" int4 everywhere. Each tensor's format is its values' dtype, so a loader reads it off the abstract model
(or a checkpoint's stored arrays) rather than off the spelling.

Why our own layer and not qwix: qwix quantises by intercepting `dot_general` / `ragged_dot` calls of a float model
(PTQ from materialised float weights), its kernels are TPU (Mosaic) ones, and its ragged_dot is XLA's; keeping the
checkpoint's fp8 bytes and scales, and feeding them to our own Triton grouped matmul, would mean converting to and
from its QArray at every boundary. The format above is the same idea (values + a tiled scale) in one small file.

Accuracy (README "Quantised weights", `benchmarks/quant_logits.py`): the formats' weight and logit errors are in
benchmarks/RESULTS.md ("Quantisation accuracy: the formats' errors"); the tests' tolerances follow from them.

Compute (`qdot`, dense linears): with one scale row (fp8 per tensor or per block column, int8 per channel) the
product is (x @ q) * scale, the cast of q fused into the dot by XLA; otherwise (int4 groups, block grids) the weight
is dequantised in the compute dtype and multiplied (XLA fuses the dequantisation into the dot's operand on GPUs).
The routed experts go through `kernels.gmm` with the QArray itself (in-kernel dequantisation with the Pallas backend).

W8A8 (`from_pretrained(..., activations="fp8")`, fp8 only): the QArray also carries the checkpoint's static activation
scale (`act_scale`, parameters `kernel_act_scale` / `gate_up_act_scale` / `down_act_scale`, [..., 1, 1]); the input
is quantised to e4m3 with it and the product is fp8 x fp8 in float32, times s_x * s_w (`w8a8_dot`; the experts'
`gmm_w8a8_pallas`). Inference only. Models quantised here have no activation scales and are refused W8A8 (no
calibration of them is written); the checkpoint loader names the first weight without one.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from small4_jax.errors import ConfigError

FORMATS = ("fp8", "int8", "int4")  # the formats of one quantised tensor (`quantize`, `format_of`)
INT4_GROUP = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP8 = jnp.dtype(jnp.float8_e4m3fn)

# Modules whose linears are quantised (module names as in model.py); lm_head, embeddings, norms, router never.
QUANTISED_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                     "gate_proj", "up_proj", "down_proj")


def check_format(fmt: str | None, where: str = "quantize") -> str | None:
    """None (no quantisation) or one of SPELLINGS; anything else is a ConfigError naming the choices."""
    if fmt is None or fmt in ("none", "bf16", "bfloat16"):
        return None
    if fmt not in SPELLINGS:
        raise ConfigError(f"{where} = {fmt!r}: expected one of {', '.join(SPELLINGS)} (or none)")
    return fmt


class Policy(NamedTuple):
    """The tensor format of each part of the model (FORMATS): `experts` the routed expert stacks, `dense`
    every other quantised linear (attention projections, shared expert, dense-layer MLPs)."""

    experts: str
    dense: str


# int4 is experts-only (as shipped int4 MoE releases do): the dense linears (attention projections, shared expert,
# dense-layer MLPs: about 2% of Small 4's parameters, ~1 GB more in int8 than in int4, but every token passes
# through them) stay int8 per channel. On the 100-step fine-tuned tiny model (benchmarks/quant_accuracy.py,
# RESULTS.md "Quantisation accuracy") int4 everywhere costs KL 0.18 per token and 81% greedy agreement, experts-only
# int4 KL 0.010 and 92.6% (fp8 everywhere: 0.015, 91.9%). "int4-all" keeps int4 everywhere.
POLICIES = {"fp8": Policy("fp8", "fp8"), "int8": Policy("int8", "int8"), "int4": Policy("int4", "int8"),
            "int4-all": Policy("int4", "int4")}
SPELLINGS = tuple(POLICIES)  # what `quantize=` takes


def policy(fmt: str | None, where: str = "quantize") -> Policy | None:
    """The per-part formats a `quantize=` spelling stands for (None: no quantisation); checked as `check_format`."""
    fmt = check_format(fmt, where)
    return None if fmt is None else POLICIES[fmt]


def spelling(p: Policy) -> str:
    """The `quantize=` spelling of a policy (the inverse of `policy`), e.g. for a checkpoint's stored dtypes."""
    for name, q in POLICIES.items():
        if q == p:
            return name
    raise ConfigError(f"no quantize spelling has experts in {p.experts} and the dense linears in {p.dense} "
                      f"(spellings: {', '.join(f'{k} = {v.experts}/{v.dense}' for k, v in POLICIES.items())})")


class QArray(NamedTuple):
    """A quantised weight (module docstring). A pytree of two arrays (three with W8A8); `shape` is the logical
    [..., K, N]. `act_scale` (W8A8 only, fp8 values): the checkpoint's static scale of the activations this weight
    multiplies, float32 [..., 1, 1] (one per tensor, [E, 1, 1] per expert); when present the product is fp8 x fp8
    (`quantize_act`, `w8a8_dot`, the W8A8 grouped-matmul kernel)."""

    values: jax.Array
    scale: jax.Array
    act_scale: jax.Array | None = None

    @property
    def format(self) -> str:
        return format_of(self.values.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return logical_shape(self.values.shape, self.values.dtype)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def nbytes(self) -> int:
        return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in self if a is not None))


def format_of(dtype) -> str:
    d = jnp.dtype(dtype)
    if d == _FP8:
        return "fp8"
    if d == jnp.int8:
        return "int8"
    if d == jnp.uint8:
        return "int4"
    raise ValueError(f"not a quantised values dtype: {d}")


def is_quantised_dtype(dtype) -> bool:
    return jnp.dtype(dtype) in (_FP8, jnp.dtype(jnp.int8), jnp.dtype(jnp.uint8))


def logical_shape(shape, dtype) -> tuple[int, ...]:
    """[..., K, N] of values stored with `shape` and `dtype` (int4 stores K/2 rows)."""
    shape = tuple(shape)
    if jnp.dtype(dtype) == jnp.uint8:
        return shape[:-2] + (2 * shape[-2], shape[-1])
    return shape


def int4_group(k: int) -> int:
    """The int4 group size along K: 128 when it divides K, else gcd(K, 128) (tiny test models); must be even."""
    g = math.gcd(k, INT4_GROUP)
    if g % 2:
        raise ConfigError(f"int4 quantisation needs an even K (rows are packed in pairs within a group); K = {k}")
    return g


def stored_shapes(shape, fmt: str, experts: bool = False) -> tuple[tuple[int, ...], tuple[int, ...], np.dtype]:
    """(values shape, scale shape, values dtype) of a float weight of logical `shape` [..., K, N] in `fmt`."""
    *lead, k, n = shape
    lead = tuple(lead)
    if fmt == "fp8":
        return shape, lead + (1, 1), _FP8
    if fmt == "int8":
        return shape, lead + (1, n), jnp.dtype(jnp.int8)
    g = int4_group(k)
    return lead + (k // 2, n), lead + (k // g, n), jnp.dtype(jnp.uint8)


def scale_dtype(fmt: str) -> np.dtype:
    """The stored dtype of a format's scales: bfloat16 for int4 (a scale per 128 weights), float32 otherwise."""
    return jnp.dtype(jnp.bfloat16) if fmt == "int4" else jnp.dtype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Quantise (numpy on the host or jax on a device: the same code, `xp` is the array module).
def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def quantize(w, fmt: str) -> QArray:
    """Quantise float w [..., K, N] (numpy or jax): fp8 per tensor (per leading index for stacked experts), int8 per
    output channel, int4 per group of `int4_group(K)` rows. Returns a QArray of the same array kind."""
    xp = _xp(w)
    w = w.astype(xp.float32)
    *lead, k, n = w.shape
    if fmt == "fp8":
        amax = xp.max(xp.abs(w), axis=(-2, -1), keepdims=True)
        scale = xp.where(amax > 0, amax / FP8_MAX, 1.0).astype(xp.float32)
        q = xp.clip(w / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn if xp is np else _FP8)
        return QArray(q, scale)
    if fmt == "int8":
        amax = xp.max(xp.abs(w), axis=-2, keepdims=True)  # [..., 1, N]
        scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
        return QArray(xp.clip(xp.round(w / scale), -127, 127).astype(xp.int8), scale)
    if fmt != "int4":
        raise ConfigError(f"tensor format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return quantize_int4(w)


INT4_CLIP = tuple(1.0 - 0.025 * i for i in range(17))  # clip ratios searched per group: 1 (none) down to 0.6


def int4_scale(blocks, importance=None):
    """The MSE-optimal scale of each group column: blocks float32 [..., K/g, g, N] -> [..., K/g, N] (bf16 values).

    The 16 levels are [-8, 7]. The group's largest-magnitude element e maps to -8 (scale -e/8: a negative scale when
    e > 0), so the side holding the extreme gets the extra level. Then the scale is shrunk by each ratio of
    `INT4_CLIP` (clipping the extreme), rounded to bf16 (the stored width), and the one with the least squared error
    sum_k importance[k] (q s - w)^2 over the group's column is kept. `importance` [..., K/g, g, 1] weights rows (the
    mean squared activation of each input channel, when calibration data is given; None: plain weight MSE)."""
    xp = _xp(blocks)
    idx = xp.argmax(xp.abs(blocks), axis=-2)[..., None, :]
    ext = xp.take_along_axis(blocks, idx, axis=-2)[..., 0, :]  # signed extreme [..., K/g, N]
    base = xp.where(ext != 0, -ext / 8.0, 1.0).astype(xp.float32)

    def candidate(r):
        s = _bf16(base * r)
        d = xp.clip(xp.round(blocks / s[..., None, :]), -8, 7) * s[..., None, :] - blocks
        return s, xp.sum(d * d if importance is None else importance * (d * d), axis=-2)

    def keep_better(best, cand):
        better = cand[1] < best[1]
        return xp.where(better, cand[0], best[0]), xp.where(better, cand[1], best[1])

    best = candidate(xp.float32(INT4_CLIP[0]))
    if xp is np:
        for r in INT4_CLIP[1:]:
            best = keep_better(best, candidate(np.float32(r)))
    else:  # a loop, not 17 unrolled copies (compile time inside GPTQ's scan)
        ratios = jnp.asarray(INT4_CLIP[1:], jnp.float32)
        best = jax.lax.fori_loop(0, len(ratios), lambda i, b: keep_better(b, candidate(ratios[i])), best)
    return best[0]


@functools.cache
def _jit_int4_scale():
    return jax.jit(int4_scale)


def _host_int4_scale(blocks: np.ndarray, importance) -> np.ndarray:
    """`int4_scale` of host arrays, run by XLA on the CPU (fused and multi-threaded; 1.3x numpy's speed on 2 cores,
    more on a many-core host: a [4096, 4096] weight took 1.9 s against 2.5 s); numpy where this process has no CPU
    backend. The same numbers either way."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        return int4_scale(blocks, importance)
    put = functools.partial(jax.device_put, device=cpu)
    return np.asarray(_jit_int4_scale()(put(blocks), None if importance is None else put(importance)))


def _bf16(x):
    """float32 x rounded to bfloat16 (nearest even) and widened back: the scales' stored precision."""
    if _xp(x) is np:
        return x.astype(ml_dtypes.bfloat16).astype(np.float32)
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def quantize_int4(w, importance=None, scale=None) -> QArray:
    """int4 with groups of `int4_group(K)` rows: levels [-8, 7], per-group-column scales in bfloat16 chosen by
    `int4_scale` (or given: `scale` [..., K/g, N]). `importance` [..., K] weights the rows' errors in the search."""
    xp = _xp(w)
    w = w.astype(xp.float32)
    *lead, k, n = w.shape
    g = int4_group(k)
    blocks = w.reshape(*lead, k // g, g, n)
    if scale is None:
        imp = None if importance is None else xp.asarray(importance, xp.float32).reshape(
            *xp.shape(importance)[:-1], k // g, g, 1)
        scale = int4_scale(blocks, imp) if xp is jnp else _host_int4_scale(blocks, imp)
    s = xp.asarray(scale, xp.float32)
    q = xp.clip(xp.round(blocks / s[..., None, :]), -8, 7) + 8  # [..., K/g, g, N] in [0, 15]
    return QArray(_pack_int4(q.reshape(*lead, k, n), g), s.astype(ml_dtypes.bfloat16 if xp is np else jnp.bfloat16))


GPTQ_DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (GPTQ's `percdamp`)
# stacked problems solved at once: about this many elements of w and H per batch (a batch of 4 at 4096 x 4096 takes
# 1.3 GiB of temporaries compiled for an H200): more on an accelerator, where the row loop's latency is what a
# bigger batch amortises
_GPTQ_ELEMENTS = {"gpu": 1 << 30}


def gptq_int4(w, hessian, damp: float = GPTQ_DAMP, act_order: bool = False) -> QArray:
    """int4 by GPTQ (Frantar et al. 2022): rows of w [..., K, N] (its inputs) are quantised in order, and each row's
    rounding error is fed back into the rows not yet quantised, weighted by the inverse of the Hessian
    H = sum_t x_t x_t^T [..., K, K] of the calibration inputs x_t, so the error of x W on those inputs is what is
    minimised rather than the error of W. Lazy block updates, one block per group of `int4_group(K)` rows. Leading
    axes (stacked experts) are independent problems, each with its own H, solved a batch at a time (vmapped).

    Scales: without `act_order`, each group's scales are chosen (`int4_scale`, rows weighted by diag H) when the
    group is reached, from its rows as the feedback has left them. With `act_order` the rows are visited in order of
    decreasing H[k, k] (the inputs that matter most first, while the most rows are left to absorb their error); the
    groups are still 128 consecutive rows of the original order (the packed layout is fixed), so their scales are
    chosen up front from the unmodified weight ("static groups") and each visited row uses its own group's.

    Rows no calibration input touched (H[k, k] = 0) carry no information: they are quantised as they are. jax in
    float32 on the default device (an accelerator when there is one: jit-compiled, one program per shape), matmuls
    at full float32 precision. Returns the same QArray layout as `quantize_int4` (levels [-8, 7], bf16 scales), as
    numpy arrays when `w` is one."""
    host = isinstance(w, np.ndarray)
    *lead, k, n = np.shape(w)
    if np.shape(hessian) != (*lead, k, k):
        raise ValueError(f"gptq_int4: Hessian {np.shape(hessian)} for a weight {np.shape(w)}; expected {(*lead, k, k)}")
    g = int4_group(k)
    m = math.prod(lead)
    w = jnp.asarray(w, jnp.float32).reshape(m, k, n)
    hessian = jnp.asarray(hessian, jnp.float32).reshape(m, k, k)
    batch = max(1, min(m, gptq_batch_elements() // (k * (k + n))))
    parts = [_gptq_batch(w[i:i + batch], hessian[i:i + batch], jnp.float32(damp), g, bool(act_order))
             for i in range(0, m, batch)]
    values = jnp.concatenate([p[0] for p in parts]).reshape(*lead, k // 2, n)
    scale = jnp.concatenate([p[1] for p in parts]).reshape(*lead, k // g, n)
    return QArray(np.asarray(values), np.asarray(scale)) if host else QArray(values, scale)


def gptq_batch_elements(backend: str | None = None) -> int:
    """Elements of w and H per vmapped GPTQ batch on `backend` (default: jax's)."""
    return _GPTQ_ELEMENTS.get(backend or jax.default_backend(), 1 << 27)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _gptq_batch(w, hessian, damp, g: int, act_order: bool):
    """`_gptq_one` over a batch of problems [B, K, N] / [B, K, K] -> packed values [B, K/2, N], bf16 scales."""
    with jax.default_matmul_precision("float32"):
        levels, scale = jax.vmap(lambda a, b: _gptq_one(a, b, damp, g, act_order))(w, hessian)
    return _pack_int4(levels + 8, g), scale.astype(jnp.bfloat16)


def _gptq_one(w, h, damp, g: int, act_order: bool):
    """One GPTQ problem (`gptq_int4`): w [K, N], H [K, K] -> levels int8 [K, N] in [-8, 7], scales f32 [K/g, N]."""
    k, n = w.shape
    diag = jnp.diagonal(h)
    dead = diag <= 0
    live = jnp.sum(~dead)
    mean = jnp.where(live > 0, jnp.sum(jnp.where(dead, 0.0, diag)) / jnp.maximum(live, 1), 1.0)
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0) + damp * mean)
    imp = jnp.where(dead, 1.0, diag)
    if act_order:
        perm = jnp.argsort(-diag, stable=True)
        static = int4_scale(w.reshape(k // g, g, n), imp.reshape(k // g, g, 1))  # [K/g, N], original groups
        w, h, imp = w[perm], h[perm][:, perm], imp[perm]
    u = _upper_cholesky_of_inverse(h)  # row j: the feedback coefficients of row j's error
    rows_after = jnp.arange(k)
    within = jnp.arange(g)

    def block(w, b):
        r0 = b * g
        rows = jax.lax.dynamic_slice_in_dim(w, r0, g, 0)  # [g, N]
        ub = jax.lax.dynamic_slice_in_dim(u, r0, g, 0)  # [g, K]
        ublk = jax.lax.dynamic_slice_in_dim(ub, r0, g, 1)  # [g, g]
        if act_order:
            s = static[jax.lax.dynamic_slice_in_dim(perm, r0, g) // g]  # each visited row's own group's scales
        else:
            s = int4_scale(rows[None], jax.lax.dynamic_slice_in_dim(imp, r0, g)[None, :, None])[0]
            s = jnp.broadcast_to(s, (g, n))

        def row(j, carry):
            rows, levels, errs = carry
            q = jnp.clip(jnp.round(rows[j] / s[j]), -8, 7)
            e = (rows[j] - q * s[j]) / ublk[j, j]
            rows = rows - jnp.where(within > j, ublk[j], 0.0)[:, None] * e[None, :]
            return rows, levels.at[j].set(q), errs.at[j].set(e)

        zeros = jnp.zeros((g, n), jnp.float32)
        _, levels, errs = jax.lax.fori_loop(0, g, row, (rows, zeros, zeros))
        w = w - jnp.where(rows_after >= r0 + g, ub, 0.0).T @ errs  # the lazy update of the rows after the block
        return w, (levels, s[0])

    _, (levels, scales) = jax.lax.scan(block, w, jnp.arange(k // g))
    levels = levels.reshape(k, n)
    if act_order:
        levels, scales = levels[jnp.argsort(perm)], static
    return levels.astype(jnp.int8), scales


def _upper_cholesky_of_inverse(h):
    """U upper triangular with U^T U = H^-1, from one Cholesky factorisation and one triangular inverse (half the
    work of inverting H and factorising the inverse). With J the reversal permutation and J H J = L L^T (L lower),
    H = (J L J)(J L J)^T, so H^-1 = (J L^-1 J)^T (J L^-1 J) and J L^-1 J is upper triangular with a positive
    diagonal: the Cholesky factor."""
    k = h.shape[-1]
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    return jax.scipy.linalg.solve_triangular(lower, jnp.eye(k, dtype=h.dtype), lower=True)[::-1, ::-1]


def _pack_int4(q, g: int):
    """Levels + 8 in [0, 15] [..., K, N] -> uint8 [..., K/2, N], the layout of the module docstring."""
    xp = _xp(q)
    *lead, k, n = q.shape
    q = q.astype(xp.uint8).reshape(*lead, k // g, g, n)
    return (q[..., : g // 2, :] | (q[..., g // 2:, :] << 4)).reshape(*lead, k // 2, n)


def unpack_int4(packed, group: int):
    """uint8 [..., K/2, N] -> int8 [..., K, N] in [-8, 7] (the layout of the module docstring)."""
    xp = _xp(packed)
    *lead, kh, n = packed.shape
    blocks = packed.reshape(*lead, kh // (group // 2), group // 2, n)
    lo = (blocks & 15).astype(xp.int8) - 8
    hi = (blocks >> 4).astype(xp.int8) - 8
    return xp.concatenate([lo, hi], axis=-2).reshape(*lead, 2 * kh, n)


def int_values(q: QArray):
    """The values as unpacked numbers [..., K, N] (fp8 / int8 as stored, int4 unpacked to int8)."""
    if jnp.dtype(q.values.dtype) == jnp.uint8:
        k = 2 * q.values.shape[-2]
        return unpack_int4(q.values, k // q.scale.shape[-2])
    return q.values


def dequantize(q: QArray, dtype=jnp.float32):
    """The float weight [..., K, N] in `dtype` (computed in float32): only for references, tests and export."""
    xp = _xp(q.values)
    v = int_values(q).astype(xp.float32)
    *lead, k, n = v.shape
    kb, nb = q.scale.shape[-2:]
    s = q.scale.astype(xp.float32)
    s = xp.broadcast_to(s, tuple(lead) + (kb, nb)) if s.ndim == v.ndim else s
    w = v.reshape(*lead, kb, k // kb, nb, n // nb) * s.reshape(*lead, kb, 1, nb, 1)
    return w.reshape(*lead, k, n).astype(dtype)


def column_scale(q: QArray):
    """The scale grid expanded along N, [..., Kb, N] (what a kernel multiplies a tile's columns by), in its stored
    dtype (int4's bf16 scales are read as bf16 and widened exactly in the kernel)."""
    n = q.values.shape[-1]
    nb = q.scale.shape[-1]
    return q.scale if nb == n else jnp.repeat(q.scale, n // nb, axis=-1)


# ----------------------------------------------------------------------------------------------------------------------
# W8A8: fp8 activations with the checkpoint's static scales.
ACTIVATIONS = ("fp8",)


def check_activations(activations: str | None, quantize: str | None = "fp8") -> str | None:
    """None (weight-only: activations stay in the compute dtype) or "fp8" (W8A8, which needs fp8 weights)."""
    if activations is None or activations in ("none", "bf16", "bfloat16"):
        return None
    if activations not in ACTIVATIONS:
        raise ConfigError(f"activations = {activations!r}: expected 'fp8' (W8A8: fp8 weights x fp8 activations with "
                          "the checkpoint's static activation scales) or none")
    if quantize != "fp8":
        raise ConfigError(f"activations = 'fp8' (W8A8) needs fp8 weights; quantize = {quantize!r}")
    return activations


def quantize_act(x: jax.Array, act_scale) -> jax.Array:
    """x in e4m3 with a static per-tensor scale: clamp(x / s, +-448) cast to float8_e4m3fn (round to nearest even),
    computed in float32. `w8a8_dot` does this to its input, the W8A8 grouped matmul to each row with its expert's
    scale (`kernels/gmm/quant_triton.quantize_rows`)."""
    return jnp.clip(x.astype(jnp.float32) / act_scale, -FP8_MAX, FP8_MAX).astype(_FP8)


def check_w8a8(q: QArray, where: str = "W8A8") -> None:
    """W8A8 needs fp8 values and one weight-scale row (per tensor / expert / column): the fp8 x fp8 product is
    scaled once after the sum over K."""
    if jnp.dtype(q.values.dtype) != _FP8 or q.scale.shape[-2] != 1:
        raise ConfigError(f"{where}: fp8 activations need fp8 weights with per-tensor, per-expert or per-column scales;"
                          f" got {jnp.dtype(q.values.dtype).name} values with a scale grid {list(q.scale.shape)}")


def w8a8_dot(x: jax.Array, q: QArray, dtype) -> jax.Array:
    """x [..., K] @ W [K, N] as fp8 x fp8 (W8A8): x quantised with the static scale `q.act_scale`, the dot of the two
    fp8 operands accumulated in float32, times s_x * s_w. Written as XLA's GPU compiler wants it for an FP8 GEMM
    (a dot_general of float8 operands with a float32 result and scalar scales after; `gemm_rewriter` turns it into
    cuBLASLt's `__cublas$lt$matmul$f8` with the scales as alpha when cuBLAS is chosen, and the Triton GEMM emitter
    keeps the operands fp8 otherwise). On a CPU the same program converts the fp8 operands to float32: exact
    products, the same numbers."""
    check_w8a8(q)
    s_x = jnp.reshape(q.act_scale, ()).astype(jnp.float32)
    xq = quantize_act(x, s_x)
    y = jax.lax.dot_general(xq, q.values, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * (s_x * column_scale(q)[0].astype(jnp.float32))).astype(dtype)
