"""The fine-tuning run config: one YAML with `base`, `model`, `lora`, `data`, `optim` and `train` sections, and
for `train.method: dpo | grpo` the optional `dpo` / `grpo` section (train/dpo.py, train/grpo.py).

`model` holds the architecture (Small4Config fields, as in configs/tiny.yaml), so every YAML in configs/ is also a
model preset (`load_config` reads a nested `model:` mapping). `base` says where the weights come from: a checkpoint
directory (whose architecture must then equal `model`'s, except what `model` leaves out, e.g. the vision tower,
which comes from the checkpoint: `trainer.resolve_model`) or random weights from a seed. `runtime` (optional) sets
the implementation choices of `small4_jax.runtime.Runtime` (kernels, expert parallelism, `softmax_scale`
override); they are no part of the architecture. Every other section is a frozen dataclass; unknown keys are an
error naming the file, section and key. Relative paths are resolved against the current directory (run from the
repo root, as the examples do).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


from small4_jax.config import Small4Config, check_type, read_yaml
from small4_jax.errors import ConfigError
from small4_jax.lora.adapters import LoRAConfig
from small4_jax.parallel.sharding import parse_mesh
from small4_jax.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class BaseSection:
    checkpoint: str | None = None  # HF or Mistral-native checkpoint directory; null = random weights from `seed`
    seed: int = 0  # random init when there is no checkpoint
    dtype: str = "bfloat16"  # base weights and activations; LoRA parameters are always float32
    tokenizer: str | None = None  # default: the checkpoint's, or the bundled tiny one for random weights
    moe_impl: str | None = None  # kept for old run configs: the same as runtime.moe_impl
    quantize: str | None = None  # frozen base: a small4_jax.quant.formats.SPELLINGS spelling (QLoRA); FP8 checkpoints: fp8


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: tuple[str, ...] = ()  # JSONL files
    eval: tuple[str, ...] = ()
    seq_len: int = 2048  # tokens per packed row
    seed: int = 0  # packing order and per-epoch shuffles


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-4  # peak learning rate
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global gradient-norm clipping; null = off


@dataclasses.dataclass(frozen=True)
class TrainSection:
    method: str = "sft"  # sft (train/trainer.py), dpo (train/dpo.py: preference pairs), grpo (train/grpo.py: RL)
    out_dir: str = "runs/default"  # checkpoints/, metrics.jsonl, config.yaml
    steps: int = 100
    batch_size: int = 8  # packed rows per optimizer step (all micro-batches)
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    remat: bool = False  # recompute each layer's activations in the backward pass
    loss_chunk: int = 1024  # tokens per chunk of the fp32 cross-entropy: [loss_chunk, vocab] logits held at once
    mesh: dict | None = None  # e.g. {data: 2, expert: 4, tensor: 1}; null = one device
    eval_every: int = 0  # 0 = only at the end (when there is eval data)
    ckpt_every: int = 50
    keep: int = 3  # checkpoints kept
    log_every: int = 1
    expected_tokens_per_s: float | None = None  # for validate_data's ETA; null = a stated rough default


METHODS = ("sft", "dpo", "grpo")


@dataclasses.dataclass(frozen=True)
class DPOSection:
    """Direct preference optimisation (train/dpo.py); the reference policy is the base with the adapter off."""

    beta: float = 0.1  # strength of the implicit KL to the reference
    loss: str = "sigmoid"  # sigmoid (DPO), ipo (IPO's squared loss)
    label_smoothing: float = 0.0  # conservative DPO (cDPO): assumed fraction of flipped labels, sigmoid loss only
    reference_free: bool = False  # reference log-probs taken as 0 (no reference forward)


@dataclasses.dataclass(frozen=True)
class GRPOSection:
    """Group-relative policy optimisation with rollouts from the in-process engine (train/grpo.py)."""

    group_size: int = 4  # samples per prompt
    prompts_per_step: int = 2  # prompts per optimizer step (group_size x this sequences)
    max_tokens: int = 32  # per sample
    temperature: float = 1.0
    top_p: float = 1.0
    epochs: int = 1  # optimizer steps on each step's rollouts (> 1: the ratio to the rollout policy is clipped)
    clip_eps: float = 0.2  # PPO ratio clip: [1 - clip_eps, 1 + clip_eps]
    kl_coef: float = 0.0  # k3 estimator of KL(policy || base with the adapter off), per token
    scale_rewards: bool = True  # divide advantages by the group's reward std (False: Dr. GRPO)
    loss_agg: str = "token"  # token: mean over all sampled tokens of the step; sequence: per-sample mean, then mean
    think: str = "train"  # train: [THINK] ... [/THINK] tokens in the loss; mask: out of the loss (still rewarded)
    # replay: the trainer's MoE layers use the expert ids the engine routed each rollout token to (weights from its
    # own routers: rollout routing replay); recompute: the trainer routes every token again (train/grpo.py)
    routing: str = "recompute"
    # train/rewards.py: exact, normalized, regex, json, json_schema, tool_call, length, function (module:function)
    rewards: tuple[dict, ...] = ({"type": "exact"},)
    engine_pages: int = 0  # cache pages of the rollout engine; 0 = enough for every sample at full length


@dataclasses.dataclass(frozen=True)
class RunConfig:
    base: BaseSection
    model: Small4Config
    lora: LoRAConfig
    data: DataSection
    optim: OptimSection
    train: TrainSection
    source: str = "config"
    dpo: DPOSection = DPOSection()
    grpo: GRPOSection = GRPOSection()
    # The keys the YAML's `model:` block gave: what it leaves out (the vision tower) comes from the checkpoint.
    model_keys: frozenset = frozenset()

    @property
    def runtime(self) -> Runtime:
        return self.model.runtime

    def to_dict(self) -> dict[str, Any]:
        method = (self.train.method,) if self.train.method != "sft" else ()  # its dpo / grpo section
        names = ("base", "lora", "data", "optim", "train") + method
        d = {k: dataclasses.asdict(getattr(self, k)) for k in names}
        d["model"] = self.model.to_dict()
        if "vision" not in self.model_keys and self.model.vision is None:
            del d["model"]["vision"]  # left out: the checkpoint's (trainer.resolve_model)
        d["runtime"] = self.model.runtime.to_dict()
        for sec in d.values():
            for k, v in sec.items():
                if isinstance(v, tuple):
                    sec[k] = list(v)
        return d


_SECTIONS = {"base": BaseSection, "model": Small4Config, "runtime": Runtime, "lora": LoRAConfig, "data": DataSection,
             "optim": OptimSection, "train": TrainSection, "dpo": DPOSection, "grpo": GRPOSection}


def _build(cls, d: dict, where: str):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for k, v in d.items():  # e.g. `steps: "abc"` is an error naming train.steps, not a TypeError later
        check_type(k, v, types[k], where)
    d = {k: tuple(v) if isinstance(v, list) and k in ("train", "eval", "targets") else v for k, v in d.items()}
    try:
        return cls(**d)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def from_dict(d: dict, source: str = "config") -> RunConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {sorted(_SECTIONS)}")
    unknown = sorted(set(d) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; expected {sorted(_SECTIONS)}")
    secs = {k: _build(cls, d.get(k), f"{source}: {k}") for k, cls in _SECTIONS.items()
            if k not in ("model", "runtime")}
    if not isinstance(d.get("model"), dict):
        raise ConfigError(f"{source}: model: expected a mapping of architecture fields (as in configs/tiny.yaml)")
    model = Small4Config.from_dict(d["model"], source=f"{source}: model")
    runtime = Runtime.from_dict(d.get("runtime"), f"{source}: runtime", base=model.runtime)
    if secs["base"].moe_impl:
        runtime = runtime.replace(moe_impl=secs["base"].moe_impl)
    secs["model"] = model.with_runtime(runtime)
    cfg = RunConfig(**secs, source=source, model_keys=frozenset(d["model"]))
    _check(cfg)
    return cfg


def load(path: str | Path) -> RunConfig:
    return from_dict(read_yaml(path), source=str(path))


def _check(c: RunConfig) -> None:
    s = c.source
    if c.train.method not in METHODS:
        raise ConfigError(f"{s}: train.method = {c.train.method!r}; expected one of {list(METHODS)}")
    if c.dpo.loss not in ("sigmoid", "ipo") or c.dpo.beta <= 0 or not 0 <= c.dpo.label_smoothing < 0.5:
        raise ConfigError(f"{s}: dpo: expected loss sigmoid | ipo, beta > 0 and 0 <= label_smoothing < 0.5; got "
                          f"{c.dpo.loss!r}, {c.dpo.beta}, {c.dpo.label_smoothing}")
    g = c.grpo
    if g.group_size < 2 or g.prompts_per_step <= 0 or g.max_tokens <= 0 or g.epochs <= 0:
        raise ConfigError(f"{s}: grpo: group_size must be >= 2 (advantages are relative to the group), "
                          "prompts_per_step, max_tokens and epochs positive")
    for name, value, allowed in (("loss_agg", g.loss_agg, ("token", "sequence")), ("think", g.think, ("train", "mask")),
                                 ("routing", g.routing, ("replay", "recompute"))):
        if value not in allowed:
            raise ConfigError(f"{s}: grpo.{name} = {value!r}; expected one of {list(allowed)}")
    if not c.data.train:
        raise ConfigError(f"{s}: data.train: list at least one JSONL file")
    if c.train.mesh is not None:
        parse_mesh(c.train.mesh, f"{s}: train.mesh")
    if c.data.seq_len <= 0:
        raise ConfigError(f"{s}: data.seq_len must be positive")
    t = c.train
    if t.steps <= 0 or t.batch_size <= 0 or t.grad_accum <= 0:
        raise ConfigError(f"{s}: train.steps, batch_size and grad_accum must be positive")
    if t.method == "grpo":  # a step's rows are its rollouts (train.batch_size is not read)
        rows = g.prompts_per_step * g.group_size
        if rows % t.grad_accum:
            raise ConfigError(f"{s}: train.grad_accum = {t.grad_accum} must divide grpo.prompts_per_step x "
                              f"group_size = {rows} (the step's rollouts, split into micro-batches)")
    elif t.batch_size % t.grad_accum:
        raise ConfigError(f"{s}: train.batch_size = {t.batch_size} must be a multiple of grad_accum = {t.grad_accum}")
    if t.loss_chunk <= 0:
        raise ConfigError(f"{s}: train.loss_chunk = {t.loss_chunk} must be a positive number of tokens (the "
                          "cross-entropy's chunk: [loss_chunk, vocab] float32 logits are held at once)")
    if t.ckpt_every <= 0 or t.keep <= 0:
        raise ConfigError(f"{s}: train.ckpt_every and train.keep must be positive")
    if c.optim.lr <= 0 or not 0 <= c.optim.min_lr_ratio <= 1:
        raise ConfigError(f"{s}: optim.lr must be positive and min_lr_ratio in [0, 1]")
