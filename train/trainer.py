"""The LoRA fine-tuning loop: model + adapters, a jitted train step, Orbax checkpoints, metrics.

State that changes during training is exactly: the LoRA parameters (`nnx.LoRAParam`, float32), the optax AdamW state
over them and the step; adapter dropout masks are a pure function of (lora.seed, step, micro-batch). The base model is split off once and
passed to the step as a frozen input: it has no gradient and no optimizer state.

One step = `grad_accum` micro-batches scanned inside one jit; the loss is the mean cross-entropy over all trained
target tokens of the step (sum over micro-batches / token count), so accumulation does not change it. Learning rate:
linear warm-up, then cosine to lr * min_lr_ratio; gradients clipped by global norm before AdamW.

Checkpoints (Orbax CheckpointManager, async, keeping `keep`): {params, opt_state, rng, step, data_position}. Orbax
writes each step into a temporary directory and renames it when complete, so a kill during a save leaves the
previous checkpoint as the latest readable one. Batches are a pure function of (data seed, step), so `--resume`
replays the exact batches; resumed losses equal an uninterrupted run's.

A non-finite loss stops the run before anything is saved for that step: pending saves are finished and the last
good checkpoint is named in the error.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from small4_jax.ckpt.load import checkpoint_config, from_pretrained
from small4_jax.ckpt.sharded import is_per_layer
from small4_jax.console import on_interrupt
from small4_jax.errors import ConfigError, Small4Error
from small4_jax.inputs.tokenizer import TINY_SPM_PATH, load_tokenizer as _load
from small4_jax.lora import adapters as lora
from small4_jax.nn import vision
from small4_jax.nn.model import Small4ForCausalLM, init_model
from small4_jax.nn.vision import merge_image_features
from small4_jax.parallel.placement import place_model
from small4_jax.parallel.sharding import batch_spec, make_mesh as _make
from train.config import RunConfig
from train.data import Packed, batch_indices, load_dataset

log = logging.getLogger("small4_jax")


class TrainingError(Small4Error):
    """Training cannot go on (a non-finite loss, a missing checkpoint to resume, ...)."""


# ----------------------------------------------------------------------------------------------------------------------
# Model, tokenizer, mesh.
def make_mesh(cfg: RunConfig):
    """train.mesh; with several processes and no train.mesh, data-parallel over every device of the job (one
    device per process would leave each process alone with arrays the others cannot see)."""
    if not cfg.train.mesh:
        if jax.process_count() == 1:
            return None
        log.info("train.mesh not set: data=%d over the job's %d processes", jax.device_count(), jax.process_count())
        return _make({"data": jax.device_count(), "expert": 1, "tensor": 1}, f"{cfg.source}: train.mesh")
    return _make(dict(cfg.train.mesh), f"{cfg.source}: train.mesh")


def tokenizer_path(cfg: RunConfig) -> str:
    """base.tokenizer, else the checkpoint directory's, else the bundled tiny sentencepiece model."""
    return str(cfg.base.tokenizer or cfg.base.checkpoint or TINY_SPM_PATH)


def load_tokenizer(cfg: RunConfig):
    return _load(tokenizer_path(cfg))


def resolve_model(cfg: RunConfig, found, where: str):
    """The model config of a run from a checkpoint: the checkpoint's architecture (`found`) with the run's runtime
    options, after checking that the run's `model:` block agrees with it (`Small4Config.architecture`: runtime
    options and the fields the two released formats spell differently are not compared). What the block leaves out
    comes from the checkpoint: the vision tower when `vision` is not given (`vision: null` trains the text model
    alone). A mismatch is one ConfigError naming every differing field with both values."""
    run = cfg.model
    keep_vision = run.vision is not None or "vision" not in cfg.model_keys
    if "vision" not in cfg.model_keys:
        run = run.replace(vision=found.vision)
    if not keep_vision:
        found = found.replace(vision=None)
    diff = _differences(run.architecture(), found.architecture())
    if diff:
        lines = "; ".join(f"{k} = {a!r} in the run, {b!r} in the checkpoint" for k, a, b in diff)
        raise ConfigError(f"{cfg.source}: model: differs from the checkpoint {where}: {lines}")
    return found.with_runtime(cfg.model.runtime)


def _differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append((prefix + k, va, vb))
    return out


def load_base(cfg: RunConfig, mesh=None) -> Small4ForCausalLM:
    """The frozen base model (checkpoint weights, or random ones from base.seed), placed on the mesh."""
    b, config = cfg.base, cfg.model
    if b.checkpoint:
        config = resolve_model(cfg, checkpoint_config(b.checkpoint), b.checkpoint)
        return from_pretrained(b.checkpoint, dtype=b.dtype, mesh=mesh, config=config, quantize=b.quantize)
    model = init_model(config, seed=b.seed, dtype=b.dtype, quantize=b.quantize)
    if mesh is not None:
        place_model(model, mesh, nnx.Param)
    return model


def build_model(cfg: RunConfig, mesh=None, base: Small4ForCausalLM | None = None) -> Small4ForCausalLM:
    """Base + adapters (sharded beside their base), remat and the loss chunk as configured. `base`: the base model
    already loaded on `mesh` (`load_base`; GRPO's engine serves it too), else it is loaded here."""
    model = load_base(cfg, mesh) if base is None else base
    paths = lora.apply_lora(model, cfg.lora)
    lora.shard_lora(model, mesh)
    configure(model, cfg)
    log.info("LoRA on %d modules, %s trainable parameters", len(paths), f"{lora.num_lora_params(model):,}")
    return model


def configure(model: Small4ForCausalLM, cfg: RunConfig) -> None:
    """The run config's settings of the model's training forward: `train.remat` and `train.loss_chunk`."""
    model.remat = bool(cfg.train.remat or cfg.runtime.remat)
    model.loss_chunk = int(cfg.train.loss_chunk)


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and steps.
def schedule(cfg: RunConfig) -> optax.Schedule:
    o, steps = cfg.optim, cfg.train.steps
    warm = min(o.warmup_steps, steps - 1) if steps > 1 else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warm else o.lr, peak_value=o.lr, warmup_steps=warm, decay_steps=max(steps, warm + 1),
        end_value=o.lr * o.min_lr_ratio,
    )


def optimizer(cfg: RunConfig) -> optax.GradientTransformation:
    o = cfg.optim
    adamw = optax.adamw(schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm else adamw


def token_loss(model, batch) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted cross-entropy, sum of weights) for one micro-batch; fp32 log-softmax computed in chunks of
    tokens (`Small4ForCausalLM.token_loss`), so [rows, seq, vocab] logits never exist."""
    embeds = batch.get("input_embeds")
    if "image_tower" in batch:  # projector adapters train: the projector runs here, on the frozen encoder's output
        features = model.multi_modal_projector(batch["image_tower"][0], batch["image_merge"][0])
        embeds = merge_image_features(model.embed_tokens(batch["inputs"]), batch["image_rows"], features)
    return model.token_loss(batch["inputs"], batch["targets"], batch["weights"], positions=batch["positions"],
                            segment_ids=batch["segments"], input_embeds=embeds)


@dataclasses.dataclass
class Steps:
    """The jitted functions of one run (built once per model structure)."""

    train: callable
    eval: callable


def make_steps(model: Small4ForCausalLM, tx: optax.GradientTransformation, sched: optax.Schedule) -> Steps:
    lora.set_dropout(model, True)
    graphdef, params, rng, frozen = nnx.split(model, lora.TRAINABLE, lora.DropoutKey, ...)
    lora.set_dropout(model, False)
    eval_graphdef = nnx.split(model, lora.TRAINABLE, lora.DropoutKey, ...)[0]
    del params, rng, frozen

    def micro_loss(p, rng, frozen, micro):
        m = nnx.merge(graphdef, p, rng, frozen)
        total, count = token_loss(m, micro)
        return total, count

    @jax.jit
    def train_step(params, opt_state, rng, frozen, batch, step):
        """batch: arrays [grad_accum, micro, S]. Returns new (params, opt_state, rng) and metrics.

        rng holds the run's dropout key (constant); micro-batch i of step s drops with fold_in(key, s, i)."""
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def body(carry, xs):
            g_acc, l_acc, n_acc = carry
            i, micro = xs
            keys = jax.tree.map(lambda k: jax.random.fold_in(jax.random.fold_in(k, step), i), rng)
            (total, count), g = grad_fn(params, keys, frozen, micro)
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + total, n_acc + count), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        n_micro = jax.tree.leaves(batch)[0].shape[0]
        (g, total, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (jnp.arange(n_micro), batch))
        denom = jnp.maximum(count, 1.0)
        g = jax.tree.map(lambda x: x / denom, g)
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": total / denom, "grad_norm": optax.tree.norm(g), "tokens": count, "lr": sched(step)}
        return params, opt_state, rng, metrics

    @jax.jit
    def eval_step(params, rng, frozen, batch):
        m = nnx.merge(eval_graphdef, params, rng, frozen)
        return token_loss(m, batch)

    return Steps(train_step, eval_step)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints.
def checkpoint_manager(out_dir: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager((out_dir / "checkpoints").resolve(), options=options)


def restore(mngr, step: int, template: dict) -> dict:
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def saved_steps(run_dir: str | Path) -> list[int]:
    """The steps with a complete checkpoint in a run directory (Orbax renames a step's directory when complete)."""
    d = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def check_step(run_dir: str | Path, step: int | None) -> int:
    """`step` (default: the latest) if the run saved it, else a TrainingError listing the steps there are."""
    steps = saved_steps(run_dir)
    if not steps:
        raise TrainingError(f"{run_dir}: no checkpoint in {Path(run_dir) / 'checkpoints'}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise TrainingError(f"{run_dir}: no checkpoint for step {step}; saved steps: "
                            f"{', '.join(map(str, steps))}")
    return step


def check_stacked(run_dir: str | Path) -> None:
    """A TrainingError naming the migration command when the run's checkpoints were saved before the decoder layers
    were stacked (per-layer `layers.N` adapters): they cannot be restored into today's model as they are."""
    run_dir = Path(run_dir)
    if any(is_per_layer(d) for d in (run_dir / "checkpoints").glob("*/*")):
        raise TrainingError(f"{run_dir}: its checkpoints were saved before the layers were stacked (per-layer "
                            f"adapters); rewrite the run once with `python -m small4_jax.convert --migrate --from "
                            f"{run_dir} --to {run_dir}-stacked`")


def restore_latest_readable(mngr, out: Path, template: dict) -> dict:
    """The newest checkpoint that restores. One that does not (a corrupted or half-deleted step) is skipped with a
    warning naming it and the step used instead; none readable is a TrainingError."""
    check_stacked(out)
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise TrainingError(f"{out}: --resume but no checkpoint in {out / 'checkpoints'}")
    failures, unreadable = [], []
    for step in steps:
        try:
            state = restore(mngr, step, template)
        except Exception as e:  # Orbax / TensorStore raise many types for a damaged checkpoint
            failures.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            unreadable.append(step)
            log.warning("checkpoint step %d in %s cannot be restored (%s); trying the one before", step,
                        out / "checkpoints", failures[-1])
            continue
        if failures:
            log.warning("resuming from step %d: the newer checkpoint(s) %s are unreadable", step,
                        ", ".join(f.split(":")[0] for f in failures))
            _move_aside(mngr, out, unreadable)
        return state
    raise TrainingError(f"{out}: no checkpoint in {out / 'checkpoints'} can be restored: " + "; ".join(failures))


def _move_aside(mngr, out: Path, steps: list[int]) -> None:
    """Rename unreadable step directories to `unreadable-<step>` (kept for a post-mortem, ignored by Orbax): left
    in place, they would make the manager skip saving those steps again (it saves only past its latest step), and
    the resumed run would end with its newest checkpoint still the damaged one."""
    if jax.process_index() == 0:
        moved = []
        for step in steps:
            src = out / "checkpoints" / str(step)
            moved.append(src.rename(src.with_name(f"unreadable-{step}-{time.strftime('%Y%m%d-%H%M%S')}")).name)
        log.warning("moved the unreadable checkpoint(s) aside in %s: %s", out / "checkpoints", ", ".join(moved))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("small4: unreadable checkpoints moved aside")
    mngr.reload()


def restore_lora(model: Small4ForCausalLM, run_dir: str | Path, step: int | None = None) -> int:
    """Load the LoRA parameters of a run's checkpoint (latest, or `step`) into `model` (adapters attached)."""
    import orbax.checkpoint as ocp

    check_stacked(run_dir)
    mngr = ocp.CheckpointManager(Path(run_dir).resolve() / "checkpoints")
    step = check_step(run_dir, step)
    params = nnx.state(model, lora.TRAINABLE)
    abstract = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, params)}
    restored = mngr.restore(step, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
    nnx.update(model, restored["params"])
    mngr.close()
    return step


# ----------------------------------------------------------------------------------------------------------------------
# The loop.
def put_batch(batch: dict, accum: int, mesh) -> dict:
    """[B, S] host arrays -> [accum, B / accum, S] on the mesh, the rows split over the batch axes
    (`sharding.batch_spec`: data and expert, as far as they divide the micro-batch).

    Every process holds the same batch (a pure function of seed and step), so with several processes each one
    places its own shards of the same global array.
    """
    out = {}
    for k, v in batch.items():
        v = v.reshape(accum, v.shape[0] // accum, *v.shape[1:])
        if mesh is None:
            out[k] = jnp.asarray(v)
            continue
        out[k] = jax.device_put(v, NamedSharding(mesh, batch_spec(mesh, v.shape[1], leading=1)))
    return out


def _global(tree, mesh):
    """Leaves not yet on the mesh (host scalars, single-device keys) replicated over it: Orbax saves and restores
    only global arrays when several processes share a checkpoint."""
    if mesh is None:
        return tree
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(x):
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(put, tree)


def with_images(batch: dict, data: Packed, idx, model, accum: int = 1) -> dict:
    """For a dataset with images: what the loss needs to put image features in the [IMG] rows.

    The vision encoder is frozen, so its work is done here, once, outside the gradient. With the projector frozen
    too (the default) that is the whole image path: `input_embeds` [B, S, H]. With adapters on the projector (LoRA
    target "projector"), each micro-batch's encoder output (`image_tower` [accum, 1, N, D], `image_merge`
    [accum, 1, M, 4], padded to the step's largest) goes in the batch and the projector runs inside the loss."""
    if model is None or not data.has_images:
        return batch
    if not any(p.startswith("multi_modal_projector.") for p in lora.adapters(model)):
        batch["input_embeds"] = vision.input_embeddings(model, batch["inputs"], data.take_images(idx))
        return batch
    vc = model.config.vision
    micro = np.asarray(idx).reshape(accum, -1)
    inputs = batch["inputs"].reshape(accum, micro.shape[1], -1)
    packs = [vision.pack_images(vc, data.take_images(i)) for i in micro]
    n = max(p.patches.shape[0] for p in packs)
    m = max(p.merge_index.shape[0] for p in packs)
    towers, merges = [], []
    for p, ids in zip(packs, inputs):
        vision.check_image_tokens(vc, ids, p)
        out = vision.encode_tower(model, p)
        towers.append(jnp.pad(out, ((0, n - out.shape[0]), (0, 0))))
        merges.append(np.pad(p.merge_index, ((0, m - p.merge_index.shape[0]), (0, 0))))
    batch["image_tower"] = jnp.stack(towers)
    batch["image_merge"] = np.stack(merges)
    batch["image_rows"] = np.concatenate([vision.image_token_rows(vc, ids) for ids in inputs])
    return batch


def evaluate(steps: Steps, params, rng, frozen, data: Packed, batch_size: int, mesh, model=None) -> float:
    total, count = 0.0, 0.0
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, min(start + batch_size, len(data)))
        idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])  # fixed shape; repeats weighted 0
        batch = with_images(data.take(idx), data, idx, model)
        batch["weights"] = batch["weights"] * (np.arange(batch_size) < min(batch_size, len(data) - start))[:, None]
        b = {k: v[0] for k, v in put_batch(batch, 1, mesh).items()}
        t, c = steps.eval(params, rng, frozen, b)
        total, count = total + _scalar(t), count + _scalar(c)
    return total / max(count, 1.0)


def train(cfg: RunConfig, *, resume: bool = False, stop_after: int | None = None) -> list[dict]:
    """Run (or resume) the configured fine-tune; returns the metrics records of the steps run in this call."""
    out = prepare_run_dir(cfg, resume)
    tokenizer = load_tokenizer(cfg)
    train_data, stats = load_dataset(cfg.data.train, tokenizer, cfg.data.seq_len, cfg.data.seed)
    eval_data = load_dataset(cfg.data.eval, tokenizer, cfg.data.seq_len, cfg.data.seed)[0] if cfg.data.eval else None
    log.info("data: %d rows -> %d packed rows of %d (%d train tokens)", stats.rows, stats.packed_rows,
             cfg.data.seq_len, stats.train_tokens)
    mesh = make_mesh(cfg)
    model = build_model(cfg, mesh)
    t = cfg.train
    tx = optimizer(cfg)
    steps = make_steps(model, tx, schedule(cfg))
    _, params, rng, frozen = nnx.split(model, lora.TRAINABLE, lora.DropoutKey, ...)
    run = Run(cfg, out, mesh, params, tx.init(params), rng, frozen, rows_per_step=t.batch_size)

    def step(s: int) -> dict:
        idx = batch_indices(len(train_data), t.batch_size, s, cfg.data.seed)
        batch = put_batch(with_images(train_data.take(idx), train_data, idx, model, t.grad_accum), t.grad_accum, mesh)
        run.params, run.opt_state, run.rng, m = steps.train(run.params, run.opt_state, run.rng, run.frozen, batch,
                                                             jnp.int32(s))
        return m

    def after(done: int) -> dict:
        if eval_data is None or not ((t.eval_every and done % t.eval_every == 0) or done == t.steps):
            return {}
        return {"eval_loss": evaluate(steps, run.params, run.rng, run.frozen, eval_data, t.batch_size, mesh, model)}

    def line(r: dict) -> str:
        ev = f" eval {r['eval_loss']:.4f}" if "eval_loss" in r else ""
        return f"loss {r['loss']:.4f}{ev} lr {r['lr']:.2e}"

    return run.loop(step, line, resume=resume, stop_after=stop_after, after=after)


def prepare_run_dir(cfg: RunConfig, resume: bool) -> Path:
    """train.out_dir checked and made before anything is built (every method: SFT, DPO, GRPO): checkpoints without
    --resume, --resume with none, an out_dir that cannot be written; Ctrl-C then prints what --resume continues."""
    out = Path(cfg.train.out_dir)
    steps = saved_steps(out)
    if not resume and steps:
        raise TrainingError(f"{out}: already holds checkpoints; pass --resume to continue it or pick another out_dir")
    if resume and not steps:
        raise TrainingError(f"{out}: --resume but no checkpoint in {out / 'checkpoints'}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:  # with several processes, one writes the run's files and progress
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as e:
        raise TrainingError(f"train.out_dir {out}: cannot be written ({e.strerror or e})") from None

    def kept() -> str:
        done = saved_steps(out)
        if not done:
            return f"no checkpoint was saved yet in {out / 'checkpoints'}"
        return f"the last complete checkpoint is step {done[-1]} in {out / 'checkpoints'}; --resume continues from it"

    on_interrupt(kept)
    return out


def _summary(cfg: RunConfig, out: Path, last: dict) -> None:
    """The run's two closing lines: where it is, what to run next."""
    done = last["step"] >= cfg.train.steps
    state = "finished" if done else "stopped"
    print(f"run {state} at step {last['step']}/{cfg.train.steps} (loss {last['loss']:.4f}): checkpoints and "
          f"metrics.jsonl in {out}", file=sys.stderr)
    nxt = (f"python -m train.export --run {out} --peft {out / 'adapter'}" if done
           else f"python -m train.finetune --config {cfg.source} --resume")
    print(f"next: {nxt}", file=sys.stderr, flush=True)


def _scalar(x) -> float:
    """A replicated scalar as a float on any process: read from this process's own copy (with several processes
    the array also spans devices this process cannot address)."""
    return float(np.asarray(x.addressable_data(0)))


class Run:
    """One fine-tune's live state, whatever the method (SFT here, DPO in train/dpo.py, GRPO in train/grpo.py): the
    trainable LoRA parameters, the optimizer state, the dropout key (SFT; None otherwise) and the frozen rest of the
    model, committed to the mesh (or the one device), and the checkpoint manager of the run directory
    (`prepare_run_dir`). A method runs its steps through `loop`; the state it updates is `run.params`,
    `run.opt_state` (and `run.rng`)."""

    def __init__(self, cfg: RunConfig, out: Path, mesh, params, opt_state, rng, frozen, *, rows_per_step: int):
        self.cfg, self.out, self.mesh, self.rows_per_step = cfg, out, mesh, rows_per_step
        # Commit every input where the step's outputs will live, so the second step does not compile again.
        if mesh is None:
            params, opt_state, rng, frozen = jax.device_put((params, opt_state, rng, frozen), jax.local_devices()[0])
        else:
            params, opt_state, rng, frozen = _global((params, opt_state, rng, frozen), mesh)
        self.params, self.opt_state, self.rng, self.frozen = params, opt_state, rng, frozen
        self.mngr = checkpoint_manager(out, cfg.train.keep)
        self.start_step = 0
        self.primary = jax.process_index() == 0

    def state(self, step: int) -> dict:
        return _global({"params": self.params, "opt_state": self.opt_state, "rng": self.rng,
                        "step": np.asarray(step, np.int32),
                        "data_position": np.asarray(step * self.rows_per_step, np.int32)}, self.mesh)

    def start(self, resume: bool) -> bool:
        """Restore the newest readable checkpoint (--resume) and drop metrics records past it; False (and a note)
        when that checkpoint already ends the run."""
        if not resume:
            return True
        state = restore_latest_readable(self.mngr, self.out, self.state(0))
        self.params, self.opt_state, self.rng = state["params"], state["opt_state"], state["rng"]
        self.start_step = int(state["step"])
        log.info("resumed from step %d", self.start_step)
        metrics_path = self.out / "metrics.jsonl"
        if self.primary and metrics_path.exists():  # drop records past the checkpoint (they will be recomputed)
            keep = [r for r in metrics_path.read_text().splitlines()
                    if r and json.loads(r).get("step", 0) <= self.start_step]
            _writing(self.out, lambda: metrics_path.write_text("".join(r + "\n" for r in keep)))
        if self.start_step >= self.cfg.train.steps:  # (known only now: the newest checkpoint may be unreadable)
            self.mngr.close()
            print(f"{self.out}: the run is already finished (step {self.start_step} of train.steps "
                  f"{self.cfg.train.steps}); nothing to train. Raise --steps to train further.", file=sys.stderr,
                  flush=True)
            return False
        return True

    def _stop_if_not_finite(self, loss: float, done: int) -> None:
        if math.isfinite(loss):
            return
        self.mngr.wait_until_finished()
        good = self.mngr.latest_step()
        self.mngr.close()
        where = f"the last good checkpoint is step {good} in {self.out / 'checkpoints'}" if good is not None \
            else "no checkpoint was saved yet"
        raise TrainingError(f"loss is {loss} at step {done}; stopped. {where} (try a lower optim.lr)")

    def loop(self, step: Callable[[int], dict], line: Callable[[dict], str], *, resume: bool,
             stop_after: int | None, after: Callable[[int], dict] | None = None) -> list[dict]:
        """Restore (--resume), then run steps start..end: `step(s)` does optimizer step s (updating the state above)
        and returns its metrics (device scalars and host values; "loss" required, "tokens" optional); `after(done)`
        adds metrics measured after it (SFT's eval loss). A non-finite loss stops the run before anything is saved
        for that step, naming the last good checkpoint. Each step's record goes to metrics.jsonl, a checkpoint every
        train.ckpt_every steps and at the end, a progress line (`line(record)`, then timing) on stderr every
        train.log_every steps; the closing lines name what to run next. Returns this call's records."""
        import orbax.checkpoint as ocp

        if not self.start(resume):
            return []
        t = self.cfg.train
        start = self.start_step
        end = t.steps if stop_after is None else min(t.steps, stop_after)
        metrics_path = self.out / "metrics.jsonl" if self.primary else Path(os.devnull)
        records, clock = [], _Clock(start)
        with metrics_path.open("a") as mf:
            for s in range(start, end):
                m = {k: _scalar(v) if isinstance(v, jax.Array) else v for k, v in step(s).items()}
                done = s + 1
                self._stop_if_not_finite(m["loss"], done)
                rec = {"step": done, **m, "elapsed_s": round(time.time() - clock.t0, 3)}
                if "tokens" in m:
                    rec["tokens"] = int(m["tokens"])
                rate = clock.tick(done, m.get("tokens"))
                if rate is not None:
                    rec["tokens_per_s"] = round(rate, 1)
                if after is not None:
                    rec.update(after(done))
                if done % t.ckpt_every == 0 or done == t.steps:
                    state = self.state(done)
                    _writing(self.out, lambda: self.mngr.save(done, args=ocp.args.StandardSave(state)))
                _writing(self.out, lambda: (mf.write(json.dumps(rec) + "\n"), mf.flush()))
                records.append(rec)
                if self.primary and (done % t.log_every == 0 or done == end):
                    print(f"step {done}/{t.steps} {line(rec)} {clock.timing(done, end)}", file=sys.stderr, flush=True)
        _writing(self.out, self.mngr.wait_until_finished)
        self.mngr.close()
        if self.primary and records:
            _summary(self.cfg, self.out, records[-1])
        return records


class _Clock:
    """Throughput (when the steps count tokens) and ETA of the steps after the first one this process runs (which
    includes compiling it)."""

    def __init__(self, start: int):
        self.start, self.t0, self.tokens = start, time.time(), 0.0

    def tick(self, done: int, tokens: float | None) -> float | None:
        """The step's tokens per second so far (None for steps that count none)."""
        self.now = time.time()
        self.counted = tokens is not None
        tokens = tokens or 0.0
        if done == self.start + 1:
            self.t_first, self.tokens_first = self.now, tokens
        self.tokens += tokens
        self.steady = done - self.start - 1  # steps timed after the compiling one
        if not self.counted:
            return None
        if self.steady:
            return (self.tokens - self.tokens_first) / max(self.now - self.t_first, 1e-9)
        return self.tokens / max(self.now - self.t0, 1e-9)

    def timing(self, done: int, end: int) -> str:
        if not self.steady:
            return f"compile + first step {self.now - self.t0:.1f}s (eta from the next step)"
        eta = (end - done) * (time.time() - self.t_first) / self.steady
        eta = f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        if not self.counted:
            return f"{(self.now - self.t_first) / self.steady:.2f}s/step {eta}"
        rate = (self.tokens - self.tokens_first) / max(self.now - self.t_first, 1e-9)
        return f"tok/s {rate:,.0f} {eta}"


def _writing(out: Path, write: Callable[[], object]) -> None:
    """A checkpoint save (Orbax raises an async save's failure at the next save or wait) or a metrics write. A
    failure, such as a full disk, stops the run with a TrainingError naming the newest complete checkpoint: Orbax
    renames a step's directory only when it is complete, so the ones before stay loadable."""
    try:
        write()
    except Exception as e:
        if isinstance(e, TrainingError):
            raise
        steps = saved_steps(out)
        good = f"the last complete checkpoint is step {steps[-1]}" if steps else "no checkpoint is complete"
        reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
            reason = f"no space left on the device ({reason})"
        raise TrainingError(f"writing to {out} failed: {reason}; {good}: free space and run again with --resume") \
            from None


def clean(out_dir: str | Path) -> None:
    shutil.rmtree(out_dir, ignore_errors=True)
