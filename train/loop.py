"""The step loop shared by the preference and RL methods (train/dpo.py, train/grpo.py).

Same run directory as SFT (train/trainer.py): `config.yaml`, `metrics.jsonl` (one record per step) and Orbax
checkpoints {params, opt_state, rng, step, data_position} in `checkpoints/`, so `train.export` and
`infer.generate --lora` read a DPO or GRPO run like an SFT one. What a method supplies:

- `prepare(step, params) -> (batch, host_metrics)`: the step's device batch (a pure function of the data seed and
  the step for DPO; rollouts of the current adapter for GRPO) and metrics measured on the host;
- `update(params, opt_state, frozen, batch, step) -> (params, opt_state, metrics)`: one jitted optimizer step.

Everything a step depends on is a function of (config, step, params): `--resume` restores params, optimizer and the
step and replays the rest, so a resumed run's records equal an uninterrupted one's. Adapter dropout is off for
these methods (the policy's log-probabilities are compared across forwards).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from small4_jax.errors import ConfigError
from small4_jax.lora import adapters as lora
from train.config import RunConfig
from train.trainer import TrainingError, checkpoint_manager, restore_latest_readable


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


def check_single_device(cfg: RunConfig) -> None:
    if cfg.train.mesh:
        raise ConfigError(f"{cfg.source}: train.mesh: method {cfg.train.method} runs on one device for now; "
                          "remove train.mesh")


def run(cfg: RunConfig, params, opt_state, frozen, prepare: Callable, update: Callable, *, resume: bool,
        stop_after: int | None, log_line: Callable[[dict], str], seed: int = 0,
        rows_per_step: int = 1) -> list[dict]:
    out = Path(cfg.train.out_dir)
    if not resume and (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise TrainingError(f"{out}: already holds checkpoints; pass --resume to continue it or pick another out_dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dev = jax.devices()[0]
    params, opt_state, frozen = jax.device_put((params, opt_state, frozen), dev)
    rng = np.asarray(jax.random.key_data(jax.random.key(seed)))
    mngr = checkpoint_manager(out, cfg.train.keep)
    start = 0
    if resume:
        template = {"params": params, "opt_state": opt_state, "rng": rng, "step": np.zeros((), np.int32),
                    "data_position": np.zeros((), np.int32)}
        state = restore_latest_readable(mngr, out, template)
        params, opt_state = jax.device_put((state["params"], state["opt_state"]), dev)
        start = int(state["step"])
    metrics_path = out / "metrics.jsonl"
    if resume and metrics_path.exists():  # drop records past the checkpoint (they are recomputed)
        keep = [r for r in metrics_path.read_text().splitlines() if r and json.loads(r).get("step", 0) <= start]
        metrics_path.write_text("".join(r + "\n" for r in keep))
    t = cfg.train
    end = t.steps if stop_after is None else min(t.steps, stop_after)
    records, t0 = [], time.time()
    with metrics_path.open("a") as mf:
        for step in range(start, end):
            batch, rec = prepare(step, params)
            params, opt_state, m = update(params, opt_state, frozen, batch, jax.numpy.int32(step))
            done = step + 1
            rec = {"step": done, **{k: float(v) for k, v in m.items()}, **rec, "elapsed_s": round(time.time() - t0, 3)}
            if not math.isfinite(rec["loss"]):
                mngr.wait_until_finished()
                good = mngr.latest_step()
                mngr.close()
                raise TrainingError(f"loss is {rec['loss']} at step {done}; stopped. the last good checkpoint is "
                                    f"{good} (try a lower optim.lr)")
            if done % t.ckpt_every == 0 or done == t.steps:
                state = {"params": params, "opt_state": opt_state, "rng": rng, "step": np.asarray(done, np.int32),
                         "data_position": np.asarray(done * rows_per_step, np.int32)}
                mngr.save(done, args=ocp.args.StandardSave(state))
            mf.write(json.dumps(rec) + "\n")
            mf.flush()
            records.append(rec)
            if done % t.log_every == 0 or done == end:
                print(f"step {done}/{t.steps} {log_line(rec)} ({rec['elapsed_s']:.1f}s)", file=sys.stderr, flush=True)
    mngr.wait_until_finished()
    mngr.close()
    return records
