"""What the preference and RL methods (train/dpo.py, train/grpo.py) share beyond SFT's run: the model split without
dropout and the gradient accumulation of a loss over micro-batches inside one jitted step.

The run itself (run directory checks, Ctrl-C note, mesh placement, Orbax checkpoints {params, opt_state, rng, step,
data_position}, metrics.jsonl, resume) is SFT's (`train.trainer.prepare_run_dir`, `train.trainer.Run`), so
`train.export` and `infer.generate --lora` read a DPO or GRPO run like an SFT one. Everything a step depends on is a
function of (config, step, params): `--resume` restores params, optimizer and the step and replays the rest, so a
resumed run's records equal an uninterrupted one's. Adapter dropout is off for these methods (the policy's
log-probabilities are compared across forwards).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from small4_jax.lora import adapters as lora


def split(model):
    """(graphdef, LoRA params, everything else) with dropout off: the frozen rest is passed to the step as input."""
    lora.set_dropout(model, False)
    return nnx.split(model, lora.TRAINABLE, ...)


def accumulate(loss_fn: Callable, params, frozen, batch: dict, names: tuple[str, ...]):
    """(summed gradient, summed loss, summed metrics) of `loss_fn(params, frozen, micro) -> (loss, {name: value})`
    over the micro-batches of `batch` (arrays [grad_accum, ...]), one `lax.scan`, inside the jitted step."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(carry, micro):
        g_acc, l_acc, m_acc = carry
        (loss, m), g = grad_fn(params, frozen, micro)
        return (jax.tree.map(jax.numpy.add, g_acc, g), l_acc + loss, jax.tree.map(jax.numpy.add, m_acc, m)), None

    zero = jax.numpy.zeros((), jax.numpy.float32)
    init = (jax.tree.map(jax.numpy.zeros_like, params), zero, {k: zero for k in names})
    return jax.lax.scan(body, init, batch)[0]
