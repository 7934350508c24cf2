"""GRPO of the LoRA adapters with rollouts from the in-process engine: `train.method: grpo`.

Data: JSONL prompt rows, `{"messages": [... ending with a user or tool turn], "answer": "42" (optional), "tools":
[...] (optional), any other keys}`; the row is what reward functions see (train/rewards.py).

One step:
1. rollouts: `grpo.prompts_per_step` prompts (batches over per-epoch permutations, a pure function of data.seed and
   the step) x `group_size` samples through `infer.engine.engine.Engine` in this process. The engine serves the
   base weights (the same arrays as the trainer's: no copy) with one multi-LoRA slot; the current adapter is written
   as a PEFT adapter (the `train.export` format) and loaded into that slot after every update, which changes arrays,
   never compiled programs. A group's samples are admitted `after` its first one, so they share its prompt's cache
   pages. Sampling seeds are a function of (data.seed, step, prompt, sample): a resumed run draws the same rollouts.
   The engine returns each sampled token's log-probability (untempered, temperature 1 = the behaviour policy);
2. rewards (train/rewards.py) per sample, on the reply text without [THINK] segments;
3. advantages, per group: A = (r - mean(r)) / (std(r) + 1e-4) (std with ddof=1, as TRL), or r - mean(r) with
   `scale_rewards: false` (Dr. GRPO); every token of a sample gets its sample's advantage;
4. `epochs` optimizer steps on those sequences (prompt + reply teacher-forced; only reply tokens in the loss, and
   with `think: mask` not the tokens from [THINK] to [/THINK]). Per token, with r = exp(logp - logp_old) (logp_old:
   the trainer's log-probs of the rollout policy, computed before the first update):
       loss_t = -min(r A, clip(r, 1 - clip_eps, 1 + clip_eps) A) + kl_coef * (exp(q) - q - 1),  q = logp_ref - logp
   (the k3 estimator of KL to the reference = the base with the adapter off: the LoRA parameters zeroed in the step).
   `loss_agg: token` averages over every reply token of the step (DAPO); `sequence` averages each sample's tokens,
   then the samples (the GRPO paper).

metrics.jsonl per step: loss, reward (mean) and reward_std, each reward's mean, reply_tokens (mean), clip_frac, kl
(mean k3, when kl_coef > 0), grad_norm, lr, the engine-vs-trainer token log-prob difference over reply tokens
(logprob_diff_max, logprob_diff_mean: the same weights, kernels differ only between paged decode and the training
forward), router_disagree (below), cached_prompt_tokens (prompt tokens the engine served from cached pages instead
of computing them), rollout_s and update_s. The step line prints the log-prob difference and router_disagree.

Routing (`routing: replay | recompute`): the engine records, for every token it runs through the model (prompt
chunks in prefill, each sampled token fed back in decode), the expert ids each MoE layer routed it to
(`Engine(record_routing=True)`: an extra output of its compiled steps, kept on the host beside the token's cache row,
so a group's later samples get the prompt's ids from the pages they share), and returns them per sample as
[prompt + reply - 1, L, k] (every token the model read; the reply's last token is never read). `build_batch` lays
them beside the teacher-forced inputs ([N, S, L, k]). With `replay` (rollout routing replay, R3) the trainer's
forwards (the old-policy and reference log-probs and every update) use those ids in every MoE layer, for the prompt
as well as the reply tokens (the replies' log-probs depend on the prompt's hidden states, so replaying the reply
alone would still leave the trainer's prompt routing free to differ), with the gate weights recomputed from the
trainer's own router probabilities at those ids and renormalised as normal routing does (`moe.replay_route`:
Megatron-LM's definition), so gradients still flow through the weights. With `recompute` the trainer's routers choose
again. In both modes `router_disagree` is the fraction of router decisions (token, layer, slot; over every token the
engine recorded, prompt and reply) whose recorded expert is not among the trainer's own top-k at that layer
(`router_disagreement`; under replay: what its router would choose given the replayed history, i.e. what
recompute would change); with replay `router_disagree_replayed` compares the ids the forward used: 0 by
construction.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from infer.engine.engine import Engine, SamplingOptions
from small4_jax.errors import ConfigError
from small4_jax.lora import adapters as lora
from small4_jax.nn.paged import default_cache_axes
from train import loop, rewards
from train.config import RunConfig
from train.data import DataError, RowError, batch_indices, prompt_ids, prompt_reason, read_jsonl
from train.trainer import (Run, build_model, load_base, load_tokenizer, make_mesh, optimizer, prepare_run_dir,
                           put_batch, schedule)


def validate_prompt(row) -> str | None:
    """None for a valid prompt row, else a one-line reason."""
    if isinstance(row, dict) and "answer" in row and not isinstance(row["answer"], (str, int, float)):
        return f"'answer' must be a string or a number, got {type(row['answer']).__name__}"
    return prompt_reason(row)


@dataclasses.dataclass
class Prompts:
    rows: list[dict]
    ids: list[list[int]]  # the chat prompt's token ids, ready for generation

    def __len__(self) -> int:
        return len(self.rows)


def load_prompts(paths: Sequence[str | Path], tokenizer, seq_len: int, max_tokens: int,
                 check_row=None) -> Prompts:
    """Read, validate and tokenise prompt rows; DataError lists every bad row as file:line: reason. `check_row`: the
    rewards' own check of a row (`rewards.Reward.check_row`: e.g. the JSON schema a reward reads from it)."""
    rows, errors = read_jsonl(paths, validate=lambda row: validate_prompt(row) or (check_row and check_row(row)))
    out = Prompts([], [])
    for file, line, row in rows:
        try:
            ids = prompt_ids(tokenizer, row["messages"], row.get("tools"))
        except Exception as e:  # the tokenizer's own checks
            errors.append(RowError(file, line, f"cannot be tokenised: {e}"))
            continue
        if len(ids) + max_tokens - 1 > seq_len:
            errors.append(RowError(file, line, f"{len(ids)} prompt tokens + grpo.max_tokens = {max_tokens} do not fit "
                                               f"data.seq_len = {seq_len} (needs {len(ids) + max_tokens - 1})"))
            continue
        out.rows.append(row)
        out.ids.append(ids)
    if errors:
        raise DataError(f"{len(errors)} bad row(s):\n" + "\n".join(f"  {e}" for e in errors))
    return out


def data_summary(cfg: RunConfig, tokenizer) -> str:
    """What train.validate_data prints for a valid prompt set (DataError for rows that cannot be used)."""
    g = cfg.grpo
    p = load_prompts(cfg.data.train, tokenizer, cfg.data.seq_len, g.max_tokens,
                     rewards.build(g.rewards, tokenizer=tokenizer).check_row)
    lens = [len(x) for x in p.ids]
    answers = sum("answer" in r for r in p.rows)
    return (f"train: {len(p)} prompts ({answers} with an answer), {min(lens)}-{max(lens)} prompt tokens, "
            f"replies up to {g.max_tokens} tokens in data.seq_len = {cfg.data.seq_len}\n"
            f"run: {cfg.train.steps} steps x {g.prompts_per_step} prompts x {g.group_size} samples = "
            f"{cfg.train.steps * g.prompts_per_step / len(p):.1f} epochs of prompts")


# ----------------------------------------------------------------------------------------------------------------------
# Advantages and the loss (pure functions; the test checks them against numpy).
def group_advantages(r: np.ndarray, scale: bool = True) -> np.ndarray:
    """Rewards [prompts, group] -> advantages [prompts, group]: centred per group, divided by its std (ddof=1)."""
    r = np.asarray(r, np.float64)
    a = r - r.mean(axis=1, keepdims=True)
    if scale:
        a = a / (r.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    return a.astype(np.float32)


def token_coefficients(weights: np.ndarray, agg: str) -> np.ndarray:
    """Per-token loss coefficients [N, S] whose weighted sum is the configured average (token or sequence)."""
    w = np.asarray(weights, np.float32)
    if agg == "token":
        return w / max(float(w.sum()), 1.0)
    return w / np.maximum(w.sum(axis=1, keepdims=True), 1.0) / len(w)


def policy_loss(logp, old_logp, ref_logp, adv, coef, clip_eps: float, kl_coef: float):
    """(loss, metrics) of the clipped policy gradient with a k3 KL penalty; arrays [N, S], adv [N]."""
    ratio = jnp.exp(logp - old_logp)
    a = adv[:, None]
    pg = -jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
    q = ref_logp - logp
    k3 = jnp.exp(q) - q - 1.0
    per_token = pg + kl_coef * k3
    clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)
    return jnp.sum(per_token * coef), {"clip_frac": jnp.sum(clipped * coef), "kl": jnp.sum(k3 * coef)}


def router_disagreement(own, recorded):
    """The fraction of router decisions (token, layer, slot) where the expert the engine used (`recorded`) is not
    among the trainer's top-k (`own`), both [..., L, k]: the top-k compared as sets per token and layer. Counted
    over the (token, layer) rows the engine recorded (no -1: dense layers, padding, tokens it did not record)."""
    missing, decisions = _disagreement_counts(own, recorded)
    return missing / jnp.maximum(decisions, 1)


def _disagreement_counts(own, recorded):
    """(decisions missing from `own`, decisions counted): `router_disagreement`'s numerator and denominator."""
    recorded, own = jnp.asarray(recorded, jnp.int32), jnp.asarray(own, jnp.int32)
    valid = jnp.all(recorded >= 0, axis=-1, keepdims=True)  # [..., L, 1]
    missing = ~jnp.any(recorded[..., :, None] == own[..., None, :], axis=-1) & valid
    return jnp.sum(missing), jnp.sum(valid) * recorded.shape[-1]


def make_steps(graphdef, cfg: RunConfig, tx, sched):
    g = cfg.grpo
    replay = g.routing == "replay"

    def logprobs(p, frozen, b, return_routing=False):
        m = nnx.merge(graphdef, p, frozen)
        return m.token_logprobs(b["inputs"], b["targets"], positions=b["positions"], segment_ids=b["segments"],
                                routing=b["routing"] if replay else None, return_routing=return_routing)

    @jax.jit
    def rollout_logprobs(params, frozen, batch):
        """(trainer log-probs of the rollout policy, of the reference with the adapter off) for batch arrays
        [grad_accum, rows per micro-batch, S], one micro-batch at a time (`lax.map`, as the update takes them), and
        the router disagreement with the engine's recorded ids over all of them: of the trainer's own top-k, and
        (replay) of the ids it used."""
        def micro(b):
            lp, (used, own) = logprobs(params, frozen, b, return_routing=True)
            ref = logprobs(jax.tree.map(jnp.zeros_like, params), frozen, b) if g.kl_coef else lp
            counts = {"router_disagree": _disagreement_counts(own, b["routing"])}
            if replay:
                counts["router_disagree_replayed"] = _disagreement_counts(used, b["routing"])
            return lp, ref, counts

        lp, ref, counts = jax.lax.map(micro, batch)
        return lp, ref, {k: jnp.sum(c[0]) / jnp.maximum(jnp.sum(c[1]), 1) for k, c in counts.items()}

    def micro(p, frozen, b):
        lp = logprobs(p, frozen, b)
        return policy_loss(lp, b["old_logp"], b["ref_logp"], b["adv"], b["coef"], g.clip_eps, g.kl_coef)

    @jax.jit
    def update(params, opt_state, frozen, batch, step):
        """batch arrays [grad_accum, rows per micro-batch, ...]."""
        grad, loss, m = loop.accumulate(micro, params, frozen, batch, ("clip_frac", "kl"))
        updates, opt_state = tx.update(grad, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, **m, "grad_norm": optax.tree.norm(grad), "lr": sched(step)}

    return rollout_logprobs, update


# ----------------------------------------------------------------------------------------------------------------------
# Rollouts.
class Rollouts:
    """The in-process engine over the base weights with one adapter slot, and the current adapter's installs."""

    @staticmethod
    def engine_limits(cfg: RunConfig, longest_prompt: int, mesh=None) -> dict:
        """The engine's sizes (also what `small4_jax.plan` plans): every sample of a step decoded together, a cache
        page for each of their tokens at data.seq_len, prompts prefilled in one chunk, one adapter slot. On `mesh`
        the cache is split over the engine's default cache axes (`paged.default_cache_axes`), each shard holding its
        rows' pages and a null page of its own."""
        g = cfg.grpo
        n, page = g.prompts_per_step * g.group_size, 16
        max_len = -(-(cfg.data.seq_len + 1) // page) * page
        chunk = max(16, -(-longest_prompt // 16) * 16)
        d = math.prod(mesh.shape[a] for a in default_cache_axes(mesh, n)) if mesh is not None else 1
        pages = g.engine_pages or d * (-(-n // d) * (max_len // page) + 2)
        return dict(max_batch=n, page_size=page, num_pages=pages,
                    max_model_len=max_len, prefill_chunk=chunk, prefill_batch=1, max_loras=1,
                    max_lora_rank=cfg.lora.rank, record_routing=True)

    def __init__(self, cfg: RunConfig, base_model, tokenizer, longest_prompt: int, mesh=None):
        self.cfg, self.tokenizer = cfg, tokenizer
        lim = self.engine_limits(cfg, longest_prompt, mesh)
        n, chunk = lim["max_batch"], lim["prefill_chunk"]
        self.engine = Engine(base_model, tokenizer, **lim, prefill_chunks=(chunk,), batch_buckets=(n,),
                             max_queue=max(256, n), seed=cfg.data.seed, mesh=mesh)
        self.dir = Path(tempfile.mkdtemp(prefix="grpo-adapter-"))
        self.name: str | None = None

    def install(self, model, step: int) -> str:
        """Write the model's current adapter (PEFT) and swap it into the engine's slot (no recompilation)."""
        out = self.dir / f"step{step}"
        lora.save_peft(model, out)
        if self.name is not None:
            self.engine.unload_adapter(self.name)
        self.name = f"policy-{step}"
        self.engine.load_adapter(self.name, str(out))
        if step > 0:
            shutil.rmtree(self.dir / f"step{step - 1}", ignore_errors=True)
        return self.name

    def sample(self, prompts: list[list[int]], step: int) -> list[list[tuple[list[int], list[float], np.ndarray]]]:
        """Per prompt, group_size (token ids, their log-probs, the routed expert ids of prompt + reply but the last
        token [T - 1, L, k]) samples of the installed adapter."""
        g = self.cfg.grpo
        results: dict[tuple[int, int], tuple[list[int], list[float], np.ndarray]] = {}

        def collect(key):
            ids, lps = [], []

            def cb(out):
                ids.extend(out.token_ids)
                lps.extend(lp.logprob for lp in out.logprobs or ())
                if out.finished:
                    if out.finish_reason not in ("stop", "length"):
                        raise ConfigError(f"rollout {key} ended with {out.finish_reason}: {out.error}")
                    results[key] = (list(ids), list(lps), out.routed_experts)
            return cb

        for i, prompt in enumerate(prompts):
            first = None
            for j in range(g.group_size):
                seed = int(np.random.default_rng([self.cfg.data.seed, step, i, j]).integers(2**31 - 1))
                opts = SamplingOptions(max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p, seed=seed,
                                       logprobs=0)
                rid = self.engine.submit(prompt, opts, callback=collect((i, j)), request_id=f"s{step}-{i}-{j}",
                                         adapter=self.name, after=first)
                first = first or rid
        cached = self.engine.stats["cached_tokens"]
        while self.engine.has_work():
            self.engine.step()
        self.cached_tokens = self.engine.stats["cached_tokens"] - cached
        return [[results[(i, j)] for j in range(g.group_size)] for i in range(len(prompts))]

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def think_mask(ids: Sequence[int], think: int | None, end: int | None) -> np.ndarray:
    """1 outside [THINK] ... [/THINK] (both markers included in the span), 0 inside."""
    keep, inside = np.ones(len(ids), np.float32), False
    for k, t in enumerate(ids):
        if t == think:
            inside = True
        if inside:
            keep[k] = 0.0
        if t == end:
            inside = False
    return keep


def build_batch(prompts: list[list[int]], samples, seq_len: int, pad: int, keep_masks) -> dict[str, np.ndarray]:
    """Teacher-forced rows [N, S] of prompt + reply (N = prompts x group, group-major) and the engine's log-probs
    aligned with the targets; weights 1 on the reply's targets (times keep_masks, e.g. thinking masked); the
    engine's routed expert ids of each input token [N, S, L, k] (-1 past the sequence)."""
    rows = [(p, *sample) for p, group in zip(prompts, samples) for sample in group]
    n = len(rows)
    out = {k: np.zeros((n, seq_len), np.int32) for k in ("inputs", "targets", "segments", "positions")}
    out["inputs"][:], out["targets"][:] = pad, pad
    out["weights"] = np.zeros((n, seq_len), np.float32)
    out["engine_logp"] = np.zeros((n, seq_len), np.float32)
    out["reply"] = np.zeros((n, seq_len), bool)  # every reply target, trained or not
    out["routing"] = np.full((n, seq_len, *rows[0][3].shape[1:]), -1, np.int16)
    for r, ((p, ids, lps, routed), keep) in enumerate(zip(rows, keep_masks)):
        seq = list(p) + list(ids)
        t = len(seq) - 1
        if len(routed) != t:
            raise ValueError(f"sample {r}: the engine recorded the routing of {len(routed)} tokens, not the {t} "
                             "the model read (prompt + reply but its last token)")
        unrecorded = np.flatnonzero(np.all(routed < 0, axis=(1, 2)))  # (a model without MoE layers records none)
        if unrecorded.size and (routed >= 0).any():
            raise ValueError(f"sample {r}: the engine recorded no routing for the tokens at {unrecorded.tolist()}")
        out["routing"][r, :t] = routed
        out["inputs"][r, :t], out["targets"][r, :t] = seq[:-1], seq[1:]
        out["segments"][r, :t], out["positions"][r, :t] = 1, np.arange(t)
        at = len(p) - 1
        out["weights"][r, at:at + len(ids)] = keep
        out["engine_logp"][r, at:at + len(lps)] = lps
        out["reply"][r, at:at + len(ids)] = True
    return out


def train(cfg: RunConfig, *, resume: bool = False, stop_after: int | None = None) -> list[dict]:
    """Run (or resume) a GRPO fine-tune; returns the metrics records of the steps run in this call. The run (its
    directory, train.mesh placement, checkpoints, metrics, resume) is SFT's: `train.trainer.Run`; the rollout engine
    serves the same base arrays on the same mesh."""
    g, t = cfg.grpo, cfg.train
    out = prepare_run_dir(cfg, resume)
    tokenizer = load_tokenizer(cfg)
    reward_fn = rewards.build(g.rewards, tokenizer=tokenizer)
    data = load_prompts(cfg.data.train, tokenizer, cfg.data.seq_len, g.max_tokens, reward_fn.check_row)
    mesh = make_mesh(cfg)
    model = load_base(cfg, mesh)
    base_graph, base_state = nnx.split(model)
    engine_model = nnx.merge(base_graph, base_state)  # the same weight arrays, a module tree of its own for serving
    rollouts = Rollouts(cfg, engine_model, tokenizer, max(len(x) for x in data.ids), mesh)
    build_model(cfg, mesh, base=model)
    tx, sched = optimizer(cfg), schedule(cfg)
    graphdef, params, frozen = loop.split(model)
    rollout_logprobs, update = make_steps(graphdef, cfg, tx, sched)
    rng = np.asarray(jax.random.key_data(jax.random.key(cfg.data.seed)))  # sampling seeds come from data.seed
    run = Run(cfg, out, mesh, params, tx.init(params), rng, frozen, rows_per_step=g.prompts_per_step)
    specials = []
    for piece in ("[THINK]", "[/THINK]"):
        try:
            specials.append(tokenizer.token_id(piece))
        except Exception:  # noqa: BLE001 - a tokenizer without thinking markers
            specials.append(None)

    def prepare(step, params):
        t0 = time.time()
        nnx.update(model, params)
        rollouts.install(model, step)
        idx = batch_indices(len(data), g.prompts_per_step, step, cfg.data.seed)
        prompts = [data.ids[i] for i in idx]
        samples = rollouts.sample(prompts, step)
        t1 = time.time()
        scores, keeps = [], []
        for i, group in zip(idx, samples):
            for ids, *_ in group:
                keep = think_mask(ids, *specials)
                shown = [tok for tok, k in zip(ids, keep) if k]
                scores.append(reward_fn(tokenizer.decode(shown), data.rows[i], list(ids)))
                keeps.append(keep if g.think == "mask" else np.ones(len(ids), np.float32))
        r = np.asarray([s["reward"] for s in scores], np.float32).reshape(len(prompts), g.group_size)
        adv = group_advantages(r, g.scale_rewards).reshape(-1)
        b = build_batch(prompts, samples, cfg.data.seq_len, tokenizer.pad_id or 0, keeps)
        engine_logp, reply = b.pop("engine_logp"), b.pop("reply")
        batch = put_batch(b, t.grad_accum, mesh)  # on the devices once, for both programs
        old, ref, routing = rollout_logprobs(params, run.frozen, batch)
        old, ref = (np.asarray(x).reshape(engine_logp.shape) for x in (old, ref))
        diff = np.abs(old - engine_logp)[reply]
        if g.routing != "replay":  # the update's forward routes itself
            del batch["routing"]
        batch.update(put_batch(dict(old_logp=old, ref_logp=ref, adv=adv,
                                    coef=token_coefficients(b["weights"], g.loss_agg)), t.grad_accum, mesh))
        rec = {"reward": float(r.mean()), "reward_std": float(r.std()),
               **{f"reward_{k}": float(np.mean([s[k] for s in scores])) for k in scores[0] if k != "reward"},
               "reply_tokens": float(np.mean([len(ids) for grp in samples for ids, *_ in grp])),
               "logprob_diff_max": float(diff.max()) if diff.size else 0.0,
               "logprob_diff_mean": float(diff.mean()) if diff.size else 0.0,
               **{k: float(v) for k, v in routing.items()},
               "cached_prompt_tokens": rollouts.cached_tokens, "rollout_s": round(t1 - t0, 3)}
        return batch, rec

    def step(s: int) -> dict:
        batch, rec = prepare(s, run.params)
        t0 = time.time()
        for _ in range(g.epochs):
            run.params, run.opt_state, m = update(run.params, run.opt_state, run.frozen, batch, jnp.int32(s))
        jax.block_until_ready(run.params)
        return {**m, "update_s": round(time.time() - t0, 3), **rec}

    def line(r):
        return (f"reward {r['reward']:.3f} loss {r['loss']:.4f} reply {r['reply_tokens']:.1f} tok, engine-trainer "
                f"logprob diff max {r['logprob_diff_max']:.2e} mean {r['logprob_diff_mean']:.2e}, router disagree "
                f"{r['router_disagree']:.2%} ({g.routing})")

    try:
        return run.loop(step, line, resume=resume, stop_after=stop_after)
    finally:
        rollouts.close()
