"""Image input: the Pixtral vision encoder, the Mistral3 projector, and image features in the text embeddings.

The math is ARCHITECTURE.md §3, checked against transformers' `Mistral3ForConditionalGeneration`:

    patches  = the image cut into 14x14 pixel squares, row-major           [N, C*14*14]
    x        = ln_pre(patches @ patch_conv)                                 [N, D]   (the conv as a matmul)
    for each block:  x += Attn(RMSNorm(x));  x += SwiGLU(RMSNorm(x))        bidirectional, 2-D RoPE, per image
    f        = RMSNorm(x);  2x2 neighbours concatenated channel-major;  merging_layer   [N/4, D]
    z        = linear_2(GELU(linear_1(f)))                                  [N/4, text hidden]
    text embeddings: the row of each [IMG] token is replaced by the next z; [IMG_BREAK] / [IMG_END] keep theirs.

Several images go through the encoder as one packed sequence; `segment_ids` (the image index of each patch) make
the attention block-diagonal, so each image only sees itself. Everything that depends on the image sizes (which
pixels form a patch, each patch's (row, column), which four patches merge, which text slot a merged token fills) is
computed on the host by `pack_images`, and padded to a few bucket sizes, so the jitted encoder sees fixed shapes and
is compiled once per bucket, not once per image size.

Weight layout: module and parameter names mirror transformers' (`vision_tower.transformer.layers.3.attention.q_proj`,
`multi_modal_projector.patch_merger.merging_layer`), linear kernels are [in, out], and `patch_conv.weight` keeps
torch's conv layout [D, C, P, P]. The q/k rows of HF checkpoints are in the rotate-half RoPE layout, those of
native checkpoints interleaved: `VisionConfig.rope_interleave` picks the matching rotation (layers.apply_rope).

Numerics: as the text model (norm statistics and the attention softmax in float32).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from small4_jax.config import VisionConfig
from small4_jax.errors import InputError
from small4_jax.kernels.attention import attention
from small4_jax.nn.initializers import normal_init
from small4_jax.nn.layers import ACT, RMSNorm, apply_rope
from small4_jax.parallel.sharding import mesh_axes, mesh_of

PAD_SEGMENT = -1  # segment id of the padding patches (they attend only to each other)


def _linear(din: int, dout: int, config: VisionConfig, dtype, rngs: nnx.Rngs, bias: bool = False) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype),
                      kernel_init=normal_init(config.initializer_range), rngs=rngs)


# ----------------------------------------------------------------------------------------------------------------------
# The encoder.
class PatchConv(nnx.Module):
    """Conv2d(C -> D, kernel = stride = patch, no bias) as a matmul over flattened patches.

    `weight` keeps torch's [D, C, P, P] layout; patches are flattened in the same (c, kh, kw) order (`pack_images`).
    """

    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        init = normal_init(config.initializer_range)
        self.weight = nnx.Param(init(rngs.params(), (d, c, p, p), jnp.dtype(dtype)))

    def __call__(self, patches: jax.Array) -> jax.Array:
        w = self.weight[...]
        return patches.astype(w.dtype) @ w.reshape(w.shape[0], -1).T


def rope_2d(config: VisionConfig, rows: jax.Array, cols: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [N, head_dim/2] of each patch's (row, column), float32.

    Base frequencies f_k = theta^(-2k/head_dim), k < head_dim/2. Rotation pair j < head_dim/4 turns by row * f_{2j},
    pair head_dim/4 + j by col * f_{2j+1} (Pixtral's axial 2-D RoPE; the same pairs in both weight layouts).
    """
    d = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    f_row, f_col = jnp.asarray(freqs[0::2]), jnp.asarray(freqs[1::2])
    angles = jnp.concatenate([rows.astype(jnp.float32)[:, None] * f_row, cols.astype(jnp.float32)[:, None] * f_col],
                             axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def block_diagonal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float,
                             impl: str = "auto") -> jax.Array:
    """Bidirectional attention of q, k, v [N, heads, d] in which only equal segment ids attend; returns [N, heads, d].

    The model's one attention op (kernels/attention) with every position 0 (nothing is causal) and the image index as
    the segment: blockwise / flash by default, so 12,100 patches never build [heads, N, N] scores.
    """
    zeros = jnp.zeros((1, q.shape[0]), jnp.int32)
    segs = segment_ids[None].astype(jnp.int32)
    out = attention((q * scale)[None], k[None], v[None], q_positions=zeros, k_positions=zeros, q_segments=segs,
                    k_segments=segs, impl=impl, heads_axis="vision_heads")
    return out[0]


class VisionAttention(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        self.q_proj = _linear(d, d, config, dtype, rngs)
        self.k_proj = _linear(d, d, config, dtype, rngs)
        self.v_proj = _linear(d, d, config, dtype, rngs)
        self.o_proj = _linear(d, d, config, dtype, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array) -> jax.Array:
        c = self.config
        n = x.shape[0]
        nh, hd = c.num_attention_heads, c.head_dim
        q = self.q_proj(x).reshape(n, nh, hd)
        k = self.k_proj(x).reshape(n, nh, hd)
        v = self.v_proj(x).reshape(n, nh, hd)
        q = apply_rope(q, cos[:, None], sin[:, None], c.rope_interleave)
        k = apply_rope(k, cos[:, None], sin[:, None], c.rope_interleave)
        out = block_diagonal_attention(q, k, v, segment_ids, hd**-0.5, c.attn_impl)
        return self.o_proj(out.reshape(n, nh * hd))


class VisionMLP(nnx.Module):
    """SwiGLU: down(act(gate x) * up x)."""

    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d, i = config.hidden_size, config.intermediate_size
        self.act = ACT[config.hidden_act]
        self.gate_proj = _linear(d, i, config, dtype, rngs)
        self.up_proj = _linear(d, i, config, dtype, rngs)
        self.down_proj = _linear(i, d, config, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config.hidden_size, config.norm_eps, dtype=dtype)
        self.attention = VisionAttention(config, dtype=dtype, rngs=rngs)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps, dtype=dtype)
        self.feed_forward = VisionMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, segment_ids):
        x = x + self.attention(self.attention_norm(x), cos, sin, segment_ids)
        return x + self.feed_forward(self.ffn_norm(x))


class VisionTransformer(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([VisionLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)])


class PixtralVisionModel(nnx.Module):
    """Patches [N, C*P*P] of the packed images -> features [N, D] of layer `vision_feature_layer`."""

    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.config = config
        self.patch_conv = PatchConv(config, dtype=dtype, rngs=rngs)
        self.ln_pre = RMSNorm(config.hidden_size, config.norm_eps, dtype=dtype)
        self.transformer = VisionTransformer(config, dtype=dtype, rngs=rngs)

    def __call__(self, patches, rows, cols, segment_ids) -> jax.Array:
        c = self.config
        rows_split = _row_split(patches)
        x = rows_split(self.ln_pre(self.patch_conv(patches)))
        cos, sin = rope_2d(c, rows, cols)
        layers = list(self.transformer.layers)
        # hidden_states[0] is ln_pre's output, hidden_states[i] that of block i (as transformers counts them)
        last = c.vision_feature_layer % (len(layers) + 1)
        for layer in layers[:last]:
            x = rows_split(layer(x, cos, sin, segment_ids))
        return x


def _row_split(x: jax.Array):
    """On a mesh: a constraint keeping [N, ...] activations split by rows over the vision axes between blocks (the
    heads and MLP width are split over the same axes: `sharding.RULES`), so the norms and residual adds run on 1/N of
    the patches and XLA gathers the rows before each block's projections and reduce-scatters after (sequence
    parallel); the identity elsewhere."""
    mesh = mesh_of(x)
    axes = mesh_axes("vision_heads", mesh, x.shape[0]) if mesh is not None else ()
    if not axes:
        return lambda y: y
    spec = PartitionSpec(axes[0] if len(axes) == 1 else axes, *([None] * (x.ndim - 1)))
    return lambda y: jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))


# ----------------------------------------------------------------------------------------------------------------------
# The projector.
class PatchMerger(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        m = config.spatial_merge_size
        self.merging_layer = _linear(config.hidden_size * m * m, config.hidden_size, config, dtype, rngs)

    def __call__(self, features: jax.Array, merge_index: jax.Array) -> jax.Array:
        """features [N, D]; merge_index [M, m*m] the patches of each merged token, (di, dj) row-major.

        The merged vector is channel-major (element c*m*m + di*m + dj), torch's `unfold` order.
        """
        g = features[merge_index]  # [M, m*m, D]
        return self.merging_layer(jnp.swapaxes(g, 1, 2).reshape(g.shape[0], -1))


class MultiModalProjector(nnx.Module):
    """RMSNorm -> 2x2 patch merger -> linear_1 -> GELU -> linear_2 (vision hidden -> text hidden)."""

    def __init__(self, config: VisionConfig, text_hidden: int, *, dtype, rngs: nnx.Rngs):
        bias = config.multimodal_projector_bias
        self.act = ACT[config.projector_hidden_act]
        self.norm = RMSNorm(config.hidden_size, config.projector_norm_eps, dtype=dtype)
        self.patch_merger = PatchMerger(config, dtype=dtype, rngs=rngs)
        self.linear_1 = _linear(config.hidden_size, text_hidden, config, dtype, rngs, bias=bias)
        self.linear_2 = _linear(text_hidden, text_hidden, config, dtype, rngs, bias=bias)

    def __call__(self, features: jax.Array, merge_index: jax.Array) -> jax.Array:
        merged = self.patch_merger(self.norm(features), merge_index)
        return self.linear_2(self.act(self.linear_1(merged)))


# ----------------------------------------------------------------------------------------------------------------------
# Host-side packing of images.
@dataclasses.dataclass
class PackedImages:
    """Images packed for the encoder, padded to bucket sizes (numpy, built on the host).

    patches [N, C*P*P], rows / cols / segment_ids [N] (padding: segment PAD_SEGMENT), merge_index [M, m*m] (padding
    rows point at patch 0 and are never used). `tokens[i]` is the number of merged tokens of image i (= its [IMG]
    count), in order.
    """

    patches: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    segment_ids: np.ndarray
    merge_index: np.ndarray
    tokens: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens)


def bucket(n: int, minimum: int = 16) -> int:
    """Padded size for n rows: a power of two up to 1024, then a multiple of 1024 (few shapes, little waste)."""
    n = max(n, minimum)
    if n <= 1024:
        return 1 << (n - 1).bit_length()
    return -(-n // 1024) * 1024


def image_grid(config: VisionConfig, image: np.ndarray) -> tuple[int, int]:
    """(rows, cols) of patches of a preprocessed image [C, H, W]; InputError if it does not fit the grid."""
    if image.ndim != 3 or image.shape[0] != config.num_channels:
        raise InputError(f"image array has shape {list(image.shape)}; expected [{config.num_channels}, H, W]")
    _, h, w = image.shape
    t = config.image_token_size
    if h <= 0 or w <= 0 or h % t or w % t:
        raise InputError(f"image array is {h}x{w} pixels; expected a positive multiple of {t} on each side "
                         "(preprocess images with small4_jax.inputs.images)")
    return h // config.patch_size, w // config.patch_size


def pack_images(config: VisionConfig, images: Sequence[np.ndarray]) -> PackedImages:
    """Cut preprocessed images [C, H, W] into patches and lay out positions, segments and the 2x2 merge."""
    p, m = config.patch_size, config.spatial_merge_size
    patches, rows, cols, segs, merges, tokens = [], [], [], [], [], []
    offset = 0
    for i, img in enumerate(images):
        img = np.asarray(img, np.float32)
        gh, gw = image_grid(config, img)
        c = img.shape[0]
        patches.append(img.reshape(c, gh, p, gw, p).transpose(1, 3, 0, 2, 4).reshape(gh * gw, c * p * p))
        r, q = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        rows.append(r.reshape(-1))
        cols.append(q.reshape(-1))
        segs.append(np.full(gh * gw, i))
        grid = np.arange(gh * gw).reshape(gh // m, m, gw // m, m).transpose(0, 2, 1, 3)  # [gh/m, gw/m, di, dj]
        merges.append(offset + grid.reshape(-1, m * m))
        tokens.append((gh // m) * (gw // m))
        offset += gh * gw
    n_pad, mt = bucket(offset), bucket(sum(tokens))

    def pad(parts, size, fill, dtype, width=None):
        out = np.full((size,) if width is None else (size, width), fill, dtype)
        if parts:
            cat = np.concatenate(parts)
            out[: len(cat)] = cat
        return out

    c = config.num_channels
    return PackedImages(
        patches=pad(patches, n_pad, 0.0, np.float32, c * p * p),
        rows=pad(rows, n_pad, 0, np.int32),
        cols=pad(cols, n_pad, 0, np.int32),
        segment_ids=pad(segs, n_pad, PAD_SEGMENT, np.int32),
        merge_index=pad(merges, mt, 0, np.int32, m * m),
        tokens=tokens,
    )


def image_token_rows(config: VisionConfig, ids: np.ndarray) -> np.ndarray:
    """For ids [B, T]: index of the image feature each [IMG] token takes (counted over the whole batch, row-major),
    -1 for every other token."""
    ids = np.asarray(ids)
    is_img = ids == config.image_token_id
    return np.where(is_img, np.cumsum(is_img.reshape(-1)).reshape(ids.shape) - 1, -1).astype(np.int32)


# ----------------------------------------------------------------------------------------------------------------------
# Using them.
def encode_images(model, packed: PackedImages) -> jax.Array:
    """Image features [M_padded, text hidden] of the packed images (rows past `packed.num_tokens` are padding)."""
    if getattr(model, "vision_tower", None) is None:
        raise InputError("this model has no vision encoder (its config has no 'vision' block); images cannot be used")
    graphdef, state = nnx.split((model.vision_tower, model.multi_modal_projector))
    return encode_packed(graphdef, state, packed.patches, packed.rows, packed.cols, packed.segment_ids, packed.merge_index)


def encode_tower(model, packed: PackedImages) -> jax.Array:
    """The encoder's output [N_padded, D] for the packed images (no projector): what a fine-tune that trains
    projector adapters computes once, outside the gradient (train.trainer)."""
    graphdef, state = nnx.split(model.vision_tower)
    return _tower(graphdef, state, packed.patches, packed.rows, packed.cols, packed.segment_ids)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _tower(graphdef, state, patches, rows, cols, segment_ids):
    return nnx.merge(graphdef, state)(patches, rows, cols, segment_ids)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def encode_packed(graphdef, state, patches, rows, cols, segment_ids, merge_index):
    tower, projector = nnx.merge(graphdef, state)
    return projector(tower(patches, rows, cols, segment_ids), merge_index)


def merge_image_features(embeds: jax.Array, feature_rows: jax.Array, features: jax.Array) -> jax.Array:
    """embeds [B, T, H] with each token whose feature_rows [B, T] is >= 0 replaced by that row of features [M, H]."""
    take = features[jnp.maximum(feature_rows, 0)].astype(embeds.dtype)
    return jnp.where((feature_rows >= 0)[..., None], take, embeds)


def check_image_tokens(config: VisionConfig, ids: np.ndarray, packed: PackedImages) -> None:
    """The prompt's [IMG] count must equal the images' merged token count (each image's grid in order)."""
    n = int((np.asarray(ids) == config.image_token_id).sum())
    if n != packed.num_tokens:
        raise InputError(f"the prompt has {n} [IMG] tokens but its images give {packed.num_tokens} "
                         f"({' + '.join(map(str, packed.tokens)) or '0'}); encode images and text together "
                         "(infer.chat.encode_chat)")


def input_embeddings(model, ids, images: Sequence[np.ndarray] = ()) -> jax.Array:
    """Text embeddings of ids [B, T] with the features of `images` (in prompt order) in the [IMG] rows."""
    ids = np.asarray(ids, np.int32)
    embeds = model.embed_tokens(jnp.asarray(ids))
    vc = model.config.vision
    if vc is None:
        if len(images):
            raise InputError("this model has no vision encoder (its config has no 'vision' block); images cannot be "
                             "used")
        return embeds
    packed = pack_images(vc, images)
    check_image_tokens(vc, ids, packed)
    if not packed.tokens:
        return embeds
    features = encode_images(model, packed)
    return merge_image_features(embeds, jnp.asarray(image_token_rows(vc, ids)), features)
