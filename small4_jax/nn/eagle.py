"""EAGLE draft head for speculative decoding (`Mistral-Small-4-119B-2603-eagle`): the model.

The draft is EAGLE-1 style (as vLLM's `EagleMistralLarge3`): a few Small-4 decoder layers (MLA attention, dense or
MoE MLP as its config says) fed by one linear `fc` of [token embedding ; target hidden state] (2H -> H), then a
final RMSNorm; the embedding and the lm_head are the target's (the draft ships neither):

    x_i = fc(concat(embed(t_{i+1}), h_i))          h_i: the target's final-normed hidden state at position i
    g_i = norm(layers(x_i))                         at position i, over the draft's own cache of earlier positions
    logits_i = lm_head(g_i)                         proposes t_{i+2}; g_i stands in for h_{i+1} at the next step

Loading it (config and weights) is `small4_jax.ckpt.eagle`.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
from flax import nnx

from small4_jax.config import Small4Config
from small4_jax.nn.layers import RMSNorm, linear
from small4_jax.nn.model import LayerViews, build_layer_stacks, layer_groups, rope_cos_sin, run_layers


class EagleDraft(nnx.Module):
    """fc [2H -> H] (optional bias), `layer_stacks` (Small-4 decoder layers of the draft's config, stacked as the
    target's: model.py), `norm`."""

    def __init__(self, config: Small4Config, *, dtype="float32", fc_bias: bool = False, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dtype = jnp.dtype(dtype)
        self.fc = linear(2 * c.hidden_size, c.hidden_size, c, dtype, rngs, bias=fc_bias)
        self.layer_stacks = build_layer_stacks(c, dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)

    @property
    def layers(self) -> LayerViews:
        """Layer i as `draft.layers[i]` (read-only copies sliced out of the stacks)."""
        return LayerViews(self.layer_stacks, layer_groups(self.config))

    def fuse(self, embeds: jax.Array, hidden: jax.Array) -> jax.Array:
        """fc(concat(embedding, target hidden)) [.., H]."""
        return self.fc(jnp.concatenate([embeds, hidden.astype(embeds.dtype)], axis=-1))


def as_model(draft: EagleDraft, target) -> types.SimpleNamespace:
    """A model-shaped view for `paged.forward`: the draft's layers and norm, the target's embedding and lm_head."""
    return types.SimpleNamespace(config=draft.config, embed_tokens=target.embed_tokens, layer_stacks=draft.layer_stacks,
                                 norm=draft.norm, lm_head=target.lm_head)


def reference_forward(draft: EagleDraft, target, ids: jax.Array, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The draft over a whole sequence with plain causal attention (no cache): ids [B, T] (t_{i+1}), hidden [B, T, H]
    (h_i) -> (logits [B, T, V], g [B, T, H]). For tests."""
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_cos_sin(draft.config, positions)
    h = draft.fuse(target.embed_tokens(ids), hidden)
    h, _ = run_layers(draft.layer_stacks, layer_groups(draft.config), h, None,
                      lambda layer, i, h, _: (layer(h, positions, cos, sin)[0], None), scan=False)
    g = draft.norm(h)
    logits = target.embed_tokens.attend(g) if target.lm_head is None else target.lm_head(g)
    return logits, g
