"""Direct preference optimisation (DPO, IPO, conservative DPO) of the LoRA adapters: `train.method: dpo`.

Data: JSONL rows of a prompt conversation and two candidate replies, in mistral-finetune's message style:

    {"messages": [{"role": "user", "content": "2+2?"}], "chosen": {"role": "assistant", "content": "4"},
     "rejected": {"role": "assistant", "content": "5"}, "tools": [...] (optional)}

`messages` must end with a user or tool turn; `chosen` / `rejected` are assistant messages (text, thinking chunks or
tool calls, as in SFT rows). Only the chosen / rejected reply is scored: earlier assistant turns of the prompt are
context. `python -m train.validate_data --config ...` reports every bad row as file:line: reason.

Loss, per pair, with pi = sum of the reply's token log-probabilities under the adapted model and ref = the same under
the base with the adapter switched off (the LoRA parameters replaced by zeros inside the step: no second copy of the
weights, one extra forward without gradient), z = beta * ((pi_c - ref_c) - (pi_r - ref_r)):
- sigmoid (DPO): -(1 - eps) log sigmoid(z) - eps log sigmoid(-z) (eps = dpo.label_smoothing; 0: plain DPO);
- ipo: (z / beta - 1 / (2 beta))^2 (IPO, on summed log-probabilities);
- dpo.reference_free: ref = 0 (no reference forward).
metrics.jsonl per step: loss, rewards_chosen / rewards_rejected (beta (pi - ref), mean over pairs), margin (their
difference), accuracy (fraction of pairs with the chosen reward above the rejected one), logp_chosen / logp_rejected,
grad_norm, lr.

Each pair is two unpacked rows of data.seq_len (a reply cut by seq_len keeps its first tokens; a pair whose reply
does not start within seq_len is an error). batch_size counts pairs; grad_accum micro-batches are scanned in the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train import loop
from train.config import RunConfig
from train.data import DataError, RowError, batch_indices, chat_encoder, encode_row, prompt_reason, read_jsonl
from train.trainer import (Run, build_model, load_tokenizer, make_mesh, optimizer, prepare_run_dir, put_batch,
                           schedule)


def validate_pair(row) -> str | None:
    """None for a valid preference row, else a one-line reason."""
    for key in ("chosen", "rejected"):
        reply = row.get(key) if isinstance(row, dict) else None
        if not isinstance(reply, dict) or reply.get("role") != "assistant":
            reason = prompt_reason(row)
            return reason or f"'{key}' must be an assistant message {{'role': 'assistant', 'content': ...}}"
        reason = prompt_reason(row, reply)
        if reason:
            return f"{key}: {reason}" if reason.startswith("messages[") else reason
    return None


def data_summary(cfg: RunConfig, tokenizer) -> str:
    """What train.validate_data prints for a valid preference set (DataError for rows that cannot be used)."""
    data = load_pairs(cfg.data.train, tokenizer, cfg.data.seq_len)
    t = cfg.train
    real = data.segments.sum(axis=(1, 2)) / 2
    return (f"train: {len(data)} preference pairs, {int(data.segments.sum()):,} tokens ({int(data.weights.sum()):,} "
            f"reply tokens scored), mean {real.mean():.0f} tokens per sequence of data.seq_len = {cfg.data.seq_len}\n"
            f"run: {t.steps} steps x {t.batch_size} pairs = {t.steps * t.batch_size / max(len(data), 1):.1f} epochs")


def encode_pair(row: dict, tokenizer, chat=None) -> tuple[tuple[list[int], list[bool]], tuple[list[int], list[bool]]]:
    """((ids, mask) of prompt + chosen, (ids, mask) of prompt + rejected); the masks mark the reply's tokens only."""
    context = [dict(m, weight=0) if m.get("role") == "assistant" else m for m in row["messages"]]
    extra = {"tools": row["tools"]} if "tools" in row else {}
    return tuple(encode_row({"messages": context + [dict(row[k], weight=1)], **extra}, tokenizer, chat)
                 for k in ("chosen", "rejected"))


@dataclasses.dataclass
class Pairs:
    """inputs, targets, weights (1 on the reply's targets), segments (1 real, 0 padding), positions: [N, 2, S]."""

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    segments: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, idx) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)}


def load_pairs(paths: Sequence[str | Path], tokenizer, seq_len: int) -> Pairs:
    """Read, validate and tokenise preference rows; DataError lists every bad row as file:line: reason."""
    rows, errors = read_jsonl(paths, validate=validate_pair)
    chat = chat_encoder(tokenizer)
    shape = (len(rows), 2, seq_len)
    pad = tokenizer.pad_id or 0
    out = Pairs(np.full(shape, pad, np.int32), np.full(shape, pad, np.int32), np.zeros(shape, np.float32),
                np.zeros(shape, np.int32), np.zeros(shape, np.int32))
    for r, (file, line, row) in enumerate(rows):
        try:
            encoded = encode_pair(row, tokenizer, chat)
        except Exception as e:  # the tokenizer's own checks
            errors.append(RowError(file, line, f"cannot be tokenised: {e}"))
            continue
        for j, (ids, mask) in enumerate(encoded):
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            n = len(ids) - 1
            if not any(mask[1:]):
                errors.append(RowError(file, line, f"{('chosen', 'rejected')[j]}: the reply starts after data.seq_len"
                                                   f" = {seq_len} tokens; shorten the prompt or raise data.seq_len"))
                break
            out.inputs[r, j, :n], out.targets[r, j, :n] = ids[:-1], ids[1:]
            out.weights[r, j, :n] = np.asarray(mask[1:], np.float32)
            out.segments[r, j, :n] = 1
            out.positions[r, j, :n] = np.arange(n)
    if errors:
        raise DataError(f"{len(errors)} bad row(s):\n" + "\n".join(f"  {e}" for e in errors))
    return out


def sequence_logprobs(model, batch) -> jax.Array:
    """Sum of the reply's token log-probabilities per sequence, [..., 2] for batch arrays [..., 2, S]."""
    shape = batch["inputs"].shape
    flat = {k: v.reshape(-1, shape[-1]) for k, v in batch.items()}
    lp = model.token_logprobs(flat["inputs"], flat["targets"], positions=flat["positions"],
                              segment_ids=flat["segments"])
    return jnp.sum(lp * flat["weights"], axis=-1).reshape(shape[:-1])


def dpo_loss(policy: jax.Array, reference: jax.Array, beta: float, kind: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
    """Per-pair losses [N] and their metrics from sequence log-probs [N, 2] (chosen, rejected)."""
    ratio = policy - reference
    rewards = beta * ratio
    z = rewards[:, 0] - rewards[:, 1]
    if kind == "ipo":
        losses = (z / beta - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    return losses, {"rewards_chosen": rewards[:, 0], "rewards_rejected": rewards[:, 1], "margin": z,
                    "accuracy": (z > 0).astype(jnp.float32), "logp_chosen": policy[:, 0],
                    "logp_rejected": policy[:, 1]}


def make_update(graphdef, cfg: RunConfig, tx, sched):
    d = cfg.dpo

    def micro(p, frozen, batch):
        pol = sequence_logprobs(nnx.merge(graphdef, p, frozen), batch)
        if d.reference_free:
            ref = jnp.zeros_like(pol)
        else:  # the base: the same graph with every LoRA parameter zero (the adapter switched off)
            off = jax.tree.map(jnp.zeros_like, p)
            ref = jax.lax.stop_gradient(sequence_logprobs(nnx.merge(graphdef, off, frozen), batch))
        losses, m = dpo_loss(pol, ref, d.beta, d.loss, d.label_smoothing)
        return jnp.sum(losses), {k: jnp.sum(v) for k, v in m.items()}

    @jax.jit
    def update(params, opt_state, frozen, batch, step):
        """batch arrays [grad_accum, pairs per micro-batch, 2, S]."""
        names = ("rewards_chosen", "rewards_rejected", "margin", "accuracy", "logp_chosen", "logp_rejected")
        g, total, m = loop.accumulate(micro, params, frozen, batch, names)
        n = batch["inputs"].shape[0] * batch["inputs"].shape[1]
        g = jax.tree.map(lambda x: x / n, g)
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": total / n, **{k: v / n for k, v in m.items()},
                                   "grad_norm": optax.tree.norm(g), "lr": sched(step)}

    return update


def train(cfg: RunConfig, *, resume: bool = False, stop_after: int | None = None) -> list[dict]:
    """Run (or resume) a DPO fine-tune; returns the metrics records of the steps run in this call. The run (its
    directory, train.mesh placement, checkpoints, metrics, resume) is SFT's: `train.trainer.Run`."""
    out = prepare_run_dir(cfg, resume)
    tokenizer = load_tokenizer(cfg)
    data = load_pairs(cfg.data.train, tokenizer, cfg.data.seq_len)
    mesh = make_mesh(cfg)
    model = build_model(cfg, mesh)
    tx, sched = optimizer(cfg), schedule(cfg)
    graphdef, params, frozen = loop.split(model)
    update = make_update(graphdef, cfg, tx, sched)
    t = cfg.train
    rng = np.asarray(jax.random.key_data(jax.random.key(cfg.data.seed)))  # no randomness; kept for the format
    run = Run(cfg, out, mesh, params, tx.init(params), rng, frozen, rows_per_step=t.batch_size)

    def step(s: int) -> dict:
        idx = batch_indices(len(data), t.batch_size, s, cfg.data.seed)
        batch = put_batch(data.take(idx), t.grad_accum, mesh)
        run.params, run.opt_state, m = update(run.params, run.opt_state, run.frozen, batch, jnp.int32(s))
        return m

    def line(r):
        return (f"loss {r['loss']:.4f} margin {r['margin']:.3f} acc {r['accuracy']:.2f} "
                f"chosen {r['rewards_chosen']:.3f} rejected {r['rewards_rejected']:.3f}")

    return run.loop(step, line, resume=resume, stop_after=stop_after)
