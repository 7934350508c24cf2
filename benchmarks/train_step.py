"""LoRA train-step throughput on the 8-layer full-width proxy of Small 4, against transformers + PEFT (§7.5).

    python benchmarks/train_step.py                   # P-8L-bf16: 8 layers, 128 experts, seq 4096, r=8, remat (GPU)
    python benchmarks/train_step.py --small           # a CPU smoke test: 2 layers, hidden 256, 8 experts, seq 128

Both peers run one LoRA step (forward, backward into the adapters only, global-norm clipping, AdamW) on the same
random base weights, the same adapters and the same batch, in this process:
- ours: LoRA targets "all" (`small4_jax.lora.adapters`: attention, shared expert, every routed expert as stacked
  [E, in, r] / [E, r, out] adapters) trained by the jitted step of `train.trainer.make_steps` (what
  `python -m train.finetune` runs) or, where that step does not trace (with remat it currently raises flax's
  TraceContextError), by the same step built with NNX transforms (`--step`; the table says which one ran);
- the peer: transformers `Mistral4ForCausalLM` (default experts implementation, grouped_mm where torch has it) with
  PEFT LoRA (`target_modules` for the linears, `target_parameters` for the fused experts), gradient checkpointing
  (non-reentrant) when remat is on, `torch.optim.AdamW` after `clip_grad_norm_`.
The base weights are drawn once by transformers (seeded) and loaded into our model through
`small4_jax.ckpt.load.load_weights` (the loader `from_pretrained` uses, fed from memory instead of files); the
adapter is drawn once by `apply_lora` (A kaiming-uniform, B = 0), written in PEFT layout (`lora.save_peft`) and
loaded by both sides, so the two start from identical parameters.

Correctness gate, before anything is reported: the first step's loss and LoRA gradient norm (before clipping) of
ours and of the peer must agree within the dtype's tolerance (`TOLERANCE`); a mismatch exits 1 and prints no table.
On the GPU the peer runs first and frees its memory (the proxy's base is 54.5 GB in bf16: both copies do not fit an
H100 at once); a peer that runs out of memory is reported as such and the gate falls back to a finite loss.

FLOPs ("model FLOPs", one convention for both peers; per trained token, per step = this x batch x seq):

    N_active  = parameters of the matmuls one token goes through: per layer the attention projections (q_a, q_b,
                kv_a, kv_b, o), the router (H x E), the shared expert (3 H F_sh) and top-k routed experts
                (k x 3 H F), or the dense MLP; plus the lm_head (H x V). The embedding is a row lookup: not counted.
    linear    = 2 N_active (forward) + 2 N_active (backward, input gradients only: the base is frozen, so the
                2 N_active of weight gradients a full fine-tune pays is never computed)
    adapters  = sum over the adapted projections a token goes through (routed experts: its k) of 6 r (in + out):
                forward x A and (x A) B = 2 r (in + out); backward dB, d(xA), dA and dX = 4 r (in + out)
    attention = 3 x 2 x heads x (qk_head_dim + v_head_dim) x (seq + 1) / 2 per layer: QK^T and PV over the causal
                average of (seq + 1) / 2 keys, backward = 2 x forward
    model FLOPs per token = linear + adapters + attention

Remat's recomputed forward (+2 N_active and the attention forward again) is not counted: model TFLOP/s, as
Automodel and Megatron report MFU. On the proxy at seq 4096 that is 7.93 GFLOP per token: 7.09 linear, 0.81
attention, 0.04 adapters. "% of 989 TF" divides by the H100 / H200 bf16 dense peak (PERFORMANCE.md header); the
measured matmul ceiling there is 790-798 TF.

Output: the table on stdout; `--json FILE` writes the rows, `--markdown FILE` appends the table (benchmarks/RESULTS.md).
Exit status: 0 done, 1 the correctness gate failed, 2 asked for the proxy without a GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the torch peer shares the GPU
# OpenMP threads that spin while waiting (libgomp's default) steal the CPU from XLA's threads between torch ops: on a
# shared 2-core machine that made the peer look 28x slower than it is. PASSIVE threads sleep instead; both sides
# then use all cores (printed with the results). Set before torch is imported (libgomp reads it once).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from small4_jax.lora import adapters as lora  # noqa: E402
from small4_jax.config import Small4Config  # noqa: E402

PEAK_BF16 = 989e12  # H100 / H200 SXM bf16 dense peak, FLOP/s (NVIDIA spec)
# Relative agreement of the first step (loss, gradient norm) between ours and the peer, by compute dtype.
TOLERANCE = {"float32": (1e-4, 1e-3), "bfloat16": (5e-3, 5e-2)}
OPTIM = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Shapes and FLOPs.
def proxy_config(small: bool, layers: int | None) -> Small4Config:
    """The proxy (the released dimensions, `layers` deep) or the --small shape; weights drawn with std 1.5/sqrt(H)
    so logits are far from uniform and a wrong layer moves the loss."""
    c = Small4Config.from_yaml(REPO / "configs" / "small4-119b.yaml").replace(vision=None)  # the text model
    if small:
        c = c.replace(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                      q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
                      rope_factor=8.0, original_max_position_embeddings=512, max_position_embeddings=4096)
    c = c.replace(num_hidden_layers=layers or (2 if small else 8))
    return c.replace(initializer_range=1.5 / math.sqrt(c.hidden_size))


def hf_config_dict(c: Small4Config) -> dict:
    """transformers `Mistral4Config` keyword arguments for `c`, and our softmax scale (`softmax_scale`)."""
    assert c.rope_interleave and c.rope_type == "yarn", "HF Mistral4 semantics only"
    keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "n_routed_experts", "num_experts_per_tok",
            "n_shared_experts", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob",
            "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "initializer_range", "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id")
    d = {k: getattr(c, k) for k in keys}
    d["rope_parameters"] = {
        "rope_type": "yarn", "rope_theta": c.rope_theta, "factor": c.rope_factor,
        "original_max_position_embeddings": c.original_max_position_embeddings,
        "max_position_embeddings": c.max_position_embeddings, "beta_fast": c.beta_fast, "beta_slow": c.beta_slow,
        "mscale": c.mscale, "mscale_all_dim": c.mscale_all_dim, "llama_4_scaling_beta": c.llama_4_scaling_beta,
        "partial_rotary_factor": c.qk_rope_head_dim / c.qk_head_dim,
    }
    d["softmax_scale"] = c.attn_softmax_scale  # not a Mistral4Config field: build_peer_base sets it on the modules
    return d


def flops_per_token(c: Small4Config, seq: int, rank: int, expert_rank: int) -> dict[str, float]:
    """Model FLOPs per trained token of one LoRA step (targets "all"), by term; the formula is the module docstring."""
    h, nh, k = c.hidden_size, c.num_attention_heads, c.num_experts_per_tok
    attn = [(h, c.q_lora_rank), (c.q_lora_rank, nh * c.qk_head_dim)] if c.q_lora_rank else [(h, nh * c.qk_head_dim)]
    attn += [(h, c.kv_lora_rank + c.qk_rope_head_dim), (c.kv_lora_rank, nh * (c.qk_nope_head_dim + c.v_head_dim)),
             (nh * c.v_head_dim, h)]
    fs, f, fd = c.moe_intermediate_size * c.n_shared_experts, c.moe_intermediate_size, c.intermediate_size
    shared = [(h, fs), (h, fs), (fs, h)] if fs else []
    expert = [(h, 2 * f), (f, h)]  # gate_up, down of one routed expert
    dense = [(h, fd), (h, fd), (fd, h)]
    n_active, lora_terms = h * c.vocab_size, 0.0  # lm_head
    for layer in range(c.num_hidden_layers):
        adapted = attn + (shared if c.is_moe_layer(layer) else dense)
        n_active += sum(i * o for i, o in adapted)
        lora_terms += sum(6 * rank * (i + o) for i, o in adapted)
        if c.is_moe_layer(layer):
            n_active += h * c.n_routed_experts + k * sum(i * o for i, o in expert)
            lora_terms += k * sum(6 * expert_rank * (i + o) for i, o in expert)
    attention = c.num_hidden_layers * 3 * 2 * nh * (c.qk_head_dim + c.v_head_dim) * (seq + 1) / 2
    linear = 4.0 * n_active
    return {"n_active": float(n_active), "linear": linear, "adapters": lora_terms, "attention": attention,
            "total": linear + lora_terms + attention}


def make_ids(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """Random token ids [batch, seq + 1]: inputs are [:, :-1], next-token targets [:, 1:]."""
    return np.random.RandomState(seed).randint(0, vocab, size=(batch, seq + 1)).astype(np.int32)


def _stats(times: list[float]) -> dict[str, float]:
    t = np.asarray(times)
    return {"median_s": float(np.median(t)), "p10_s": float(np.percentile(t, 10)), "p90_s": float(np.percentile(t, 90))}


# ----------------------------------------------------------------------------------------------------------------------
# Ours.
class _StateDictSource:
    """`small4_jax.ckpt.load.TensorSource` over an in-memory HF state dict (CPU torch tensors)."""

    def __init__(self, state: dict):
        self.state = {k.removeprefix("model."): v for k, v in state.items()}

    def names(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        import torch

        t = self.state[name]
        if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) and t.dtype == torch.bfloat16:
            return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)  # same bytes, no float32 round trip
        return t.float().numpy().astype(dtype, copy=False)


def _optax() -> optax.GradientTransformation:
    o = OPTIM
    return optax.chain(optax.clip_by_global_norm(o["clip"]),
                       optax.adamw(o["lr"], b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=o["weight_decay"]))


def _committed(tree):
    """Every array committed to the default device: step outputs are, so inputs that are not would make the second
    call compile again (jit keys on committed-ness)."""
    return jax.device_put(tree, jax.devices()[0])


def _trainer_step(model, batch):
    """`train.trainer.make_steps`' jitted step (what `python -m train.finetune` runs), as step(i) -> metrics."""
    from train.trainer import make_steps

    tx = _optax()
    steps = make_steps(model, tx, optax.constant_schedule(OPTIM["lr"]))
    _, params, rng, frozen = nnx.split(model, lora.TRAINABLE, lora.DropoutKey, ...)
    state = _committed({"params": params, "opt_state": tx.init(params), "rng": rng})
    frozen = _committed(frozen)
    batch = {k: v[None] for k, v in batch.items()}  # grad_accum = 1

    def step(i: int):
        state["params"], state["opt_state"], state["rng"], m = steps.train(
            state["params"], state["opt_state"], state["rng"], frozen, batch, jnp.int32(i))
        return m

    return step


def _nnx_step(model, batch):
    """The same step built from the public pieces with NNX transforms: `train.trainer.token_loss`, gradients of
    `lora.TRAINABLE` only, the same optax chain through `nnx.Optimizer(wrt=lora.TRAINABLE)`."""
    from train.trainer import token_loss

    opt = nnx.Optimizer(model, _optax(), wrt=lora.TRAINABLE)
    for m in (model, opt):
        nnx.update(m, _committed(nnx.state(m)))

    def loss_fn(m):
        total, count = token_loss(m, batch)
        return total / jnp.maximum(count, 1.0)

    @nnx.jit
    def train_step(m, opt):
        loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lora.TRAINABLE))(m)
        opt.update(m, g)
        return {"loss": loss, "grad_norm": optax.global_norm(g)}

    cached = nnx.cached_partial(train_step, model, opt)
    return lambda i: cached()


STEPS = {"trainer": _trainer_step, "nnx": _nnx_step}


def ours_step(model, ids: np.ndarray, step_impl: str = "auto"):
    """(first-step loss, gradient norm and compile time, one_step()): the first step compiles; one_step() runs the
    next step to completion.

    step_impl "trainer" is `train.trainer.make_steps`; "nnx" the same step with NNX transforms; "auto" tries the
    trainer's and falls back to "nnx" when tracing it fails (its jax.jit/value_and_grad around `nnx.merge` meets
    the model's `nnx.remat` with a flax TraceContextError at the time of writing)."""
    x, y = ids[:, :-1], ids[:, 1:]
    batch = {"inputs": x, "targets": y, "positions": np.broadcast_to(np.arange(x.shape[1], dtype=np.int32), x.shape),
             "segments": np.ones_like(x), "weights": np.ones(x.shape, np.float32)}
    batch = _committed({k: jnp.asarray(v) for k, v in batch.items()})
    t0 = time.perf_counter()
    for impl in (["trainer", "nnx"] if step_impl == "auto" else [step_impl]):
        step = STEPS[impl](model, batch)
        try:
            m = step(0)
            break
        except Exception as e:  # noqa: BLE001  (only the auto fallback swallows it)
            if step_impl != "auto" or impl == "nnx":
                raise
            print(f"note: the trainer's step failed ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                  f"timing the same step built with NNX transforms", flush=True)
    first = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "compile_s": time.perf_counter() - t0,
             "step_impl": impl}
    count = [0]

    def one_step():
        count[0] += 1
        return float(jax.block_until_ready(step(count[0]))["loss"])

    return first, one_step


def time_steps(steps: dict, warmup: int, iters: int) -> dict[str, dict]:
    """Each of `steps` (name -> one_step()) run `warmup` untimed times, then `iters` timed rounds in which every one
    runs once, in an order that alternates between rounds: peers share the machine's state (load, clocks, caches)
    fairly. Returns per name the median / p10 / p90 and the last loss."""
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    last = {}
    for i in range(iters):
        for n in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            last[n] = steps[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: {"last_loss": last[n], "timed_steps": iters, **_stats(times[n])} for n in names}


def run_ours(model, ids: np.ndarray, warmup: int, iters: int, step_impl: str = "auto", gate=None) -> dict:
    """First-step loss and gradient norm, then `iters` timed steps. `gate(first)` runs after the first step; when it
    returns False nothing is timed."""
    first, one_step = ours_step(model, ids, step_impl)
    if gate is not None and not gate(first):
        return first
    return {**first, **time_steps({"ours": one_step}, warmup, iters)["ours"]}


def build_ours(config: Small4Config, dtype: str, state: dict | None, adapter_dir: Path | None, lcfg, remat: bool):
    """Our model with adapters: base from `state` (an HF state dict) or random, adapters from `adapter_dir` or new."""
    from small4_jax.ckpt.load import load_weights
    from small4_jax.nn.model import init_model

    if state is not None:
        model = load_weights(config, _StateDictSource(state), dtype=dtype, where="transformers state dict")
    else:
        model = init_model(config, seed=0, dtype=dtype)
    if adapter_dir is not None:
        lora.load_peft(model, adapter_dir)
    else:
        lora.apply_lora(model, lcfg)
    model.remat = remat
    return model


def write_adapter(config: Small4Config, lcfg, out: Path) -> None:
    """The adapter both peers load: `apply_lora` on a shape-only model (no base weights drawn), in PEFT layout."""
    from small4_jax.nn.model import abstract_model

    abstract = abstract_model(config, dtype="float32")
    lora.apply_lora(abstract, lcfg)
    lora.save_peft(abstract, out)


# ----------------------------------------------------------------------------------------------------------------------
# The peer.
def build_peer_base(hf_kwargs: dict, dtype: str, device: str, seed: int = 0):
    """A seeded transformers `Mistral4ForCausalLM`, built directly in `dtype` on `device`, its attention softmax
    scale set to ours (`hf_kwargs["softmax_scale"]`: the plain 1/sqrt(qk_head_dim) for these configs, where
    transformers would fold YaRN's mscale^2 in; README "Numerics")."""
    import torch
    from transformers import Mistral4Config, Mistral4ForCausalLM

    hf_kwargs = dict(hf_kwargs)
    scale = hf_kwargs.pop("softmax_scale")

    tdtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)
    try:
        with torch.device(device):
            model = Mistral4ForCausalLM(Mistral4Config(**hf_kwargs))
    finally:
        torch.set_default_dtype(old)
    for module in model.modules():
        if type(module).__name__ == "Mistral4Attention":
            module.scaling = scale
    return model.to(tdtype)


def peer_step(base, adapter_dir: Path, ids: np.ndarray, device: str, remat: bool):
    """transformers + PEFT, the same step as ours (loss, backward, clip, AdamW): (first-step results, one_step(),
    close()). torch.cuda.OutOfMemoryError propagates."""
    import peft
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    o = OPTIM
    if remat:  # activation_checkpointing_enable is the newer name (transformers >= 5.2x)
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks the deprecated is_gradient_checkpointing
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"],
                            weight_decay=o["weight_decay"], fused=device == "cuda")
    x = torch.as_tensor(ids[:, :-1], dtype=torch.long, device=device)
    y = torch.as_tensor(ids[:, 1:], dtype=torch.long, device=device)

    def step():
        logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        loss = loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(params, o["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, norm

    def one_step():
        loss, _ = step()
        sync()
        return loss.item()

    def close():
        nonlocal model, opt, params
        del model, opt, params
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    t0 = time.perf_counter()
    loss, norm = step()
    sync()
    first = {"loss": loss.item(), "grad_norm": norm.item(), "compile_s": time.perf_counter() - t0}
    return first, one_step, close


def run_peer(base, adapter_dir: Path, ids: np.ndarray, device: str, remat: bool, warmup: int, iters: int) -> dict:
    """The peer alone (on a GPU, where both models do not fit at once): {"error": ...} if it runs out of memory."""
    import torch

    close = None
    try:
        first, one_step, close = peer_step(base, adapter_dir, ids, device, remat)
        return {**first, **time_steps({"peer": one_step}, warmup, iters)["peer"]}
    except torch.cuda.OutOfMemoryError as e:
        return {"error": f"out of memory ({str(e).splitlines()[0][:120]})"}
    finally:
        if close is not None:
            close()


# ----------------------------------------------------------------------------------------------------------------------
# Report.
def check(ours: dict, peer: dict | None, dtype: str) -> tuple[bool, str]:
    """The correctness gate: first-step loss and gradient norm of ours against the peer's."""
    if not math.isfinite(ours["loss"]) or not math.isfinite(ours["grad_norm"]):
        return False, f"our first-step loss / grad norm is not finite: {ours['loss']} / {ours['grad_norm']}"
    if peer is None or "error" in peer:
        why = "no peer" if peer is None else f"peer failed: {peer['error']}"
        return True, f"first-step loss {ours['loss']:.6f} finite; not compared ({why})"
    tol_loss, tol_grad = TOLERANCE[dtype]
    rl = abs(ours["loss"] - peer["loss"]) / abs(peer["loss"])
    rg = abs(ours["grad_norm"] - peer["grad_norm"]) / max(abs(peer["grad_norm"]), 1e-30)
    ok = rl <= tol_loss and rg <= tol_grad
    msg = (f"first step vs transformers+peft: loss {ours['loss']:.6f} vs {peer['loss']:.6f} (rel {rl:.1e}, "
           f"tol {tol_loss:.0e}); LoRA grad norm {ours['grad_norm']:.5g} vs {peer['grad_norm']:.5g} (rel {rg:.1e}, "
           f"tol {tol_grad:.0e}): {'ok' if ok else 'MISMATCH'}")
    return ok, msg


def table(rows: list[dict], gpu_peak: float | None) -> list[str]:
    lines = ["| impl | median step ms | p10-p90 ms | tokens/s | model TFLOP/s | % of 989 TF | ours / peer |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['error']} | - | - | - | - | - |")
            continue
        pct = f"{100 * r['tflops'] * 1e12 / gpu_peak:.1f}%" if gpu_peak else "-"
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['impl']} | {r['median_s'] * 1e3:.1f} | {r['p10_s'] * 1e3:.1f}-{r['p90_s'] * 1e3:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tflops']:.4g} | {pct} | {ratio} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke test (2 layers, hidden 256, "
                   "8 experts, seq 128, float32)")
    p.add_argument("--layers", type=int, default=None, help="default 8 (--small: 2)")
    p.add_argument("--seq", type=int, default=None, help="default 4096 (--small: 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--no-remat", action="store_true", help="keep activations instead of recomputing each layer")
    p.add_argument("--dtype", default=None, help="base and compute dtype: default bfloat16 (--small: float32)")
    p.add_argument("--moe-impl", default=None, help="our grouped matmul (config.moe_impl; default auto)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 2; --small 1)")
    p.add_argument("--iters", type=int, default=None, help="timed steps, at least 5 (default 10; --small 5)")
    p.add_argument("--step", choices=("auto", "trainer", "nnx"), default="auto",
                   help="our step: train.trainer.make_steps, the NNX-transform build, or the first that works")
    p.add_argument("--no-peer", action="store_true", help="skip transformers + peft (and the comparison)")
    p.add_argument("--json", help="write the rows and the check as JSON to this file")
    p.add_argument("--markdown", help="append the table to this file (e.g. benchmarks/RESULTS.md)")
    a = p.parse_args(argv)

    platform = jax.default_backend()
    if not a.small and platform == "cpu":
        print("train_step.py: the 8-layer full-width proxy (54.5 GB of bf16 weights, seq 4096) needs a GPU; "
              "run with --small for the CPU smoke test", file=sys.stderr)
        return 2
    seq = a.seq or (128 if a.small else 4096)
    dtype = a.dtype or ("float32" if a.small else "bfloat16")
    warmup = a.warmup if a.warmup is not None else (1 if a.small else 2)
    iters = a.iters or (5 if a.small else 10)
    if iters < 5:
        print("train_step.py: --iters must be at least 5 (a median of fewer is noise)", file=sys.stderr)
        return 2
    remat = not a.no_remat
    config = proxy_config(a.small, a.layers)
    if a.moe_impl:
        config = config.replace(moe_impl=a.moe_impl)
    lcfg = lora.LoRAConfig(targets=("all",), rank=a.rank, alpha=a.alpha, seed=0)
    ids = make_ids(config.vocab_size, a.batch, seq)
    flops = flops_per_token(config, seq, a.rank, lcfg.expert_rank(config.num_experts_per_tok))
    tokens = a.batch * seq
    dev = jax.devices()[0]
    gpu_peak = PEAK_BF16 if dev.platform == "gpu" and any(k in dev.device_kind for k in ("H100", "H200")) else None

    peer = None
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    use_peer = have_torch and not a.no_peer
    # On a CPU both models fit: their timed steps interleave in one process (`time_steps`). On a GPU the peer runs
    # first and frees its memory (both copies of the proxy do not fit).
    interleave = use_peer and platform == "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp) / "adapter"
        state = None
        peer_fn = close_peer = None
        if use_peer:
            write_adapter(config, lcfg, adapter_dir)
            device = "cuda" if platform == "gpu" else "cpu"
            base = build_peer_base(hf_config_dict(config), dtype, device)
            state = {k: v.detach().to("cpu") for k, v in base.state_dict().items()}  # the bytes ours will load
            if interleave:
                peer, peer_fn, close_peer = peer_step(base, adapter_dir, ids, device, remat)
            else:
                peer = run_peer(base, adapter_dir, ids, device, remat, warmup, iters)
            del base
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        model = build_ours(config, dtype, state, adapter_dir if use_peer else None, lcfg, remat)
        del state
        gc.collect()

        verdict = {}

        def gate(first):  # on our first step, before any of our timed steps
            verdict["ok"], verdict["msg"] = check(first, peer, dtype)
            print(verdict["msg"], flush=True)
            return verdict["ok"]

        if interleave:
            ours, ours_fn = ours_step(model, ids, a.step)
            if not gate(ours):
                return 1
            timed = time_steps({"ours": ours_fn, "peer": peer_fn}, warmup, iters)
            ours, peer = {**ours, **timed["ours"]}, {**peer, **timed["peer"]}
            close_peer()
        else:
            ours = run_ours(model, ids, warmup, iters, a.step, gate)
        if not verdict["ok"]:
            return 1
        msg = verdict["msg"]

    rows = []
    for impl, r in (("small4_jax", ours), ("transformers+peft", peer)):
        if r is None:
            continue
        row = {"impl": impl if r is peer else f"small4_jax ({r['step_impl']} step)", **r}
        if "error" not in r:
            row.update(tokens_per_s=tokens / r["median_s"], tflops=flops["total"] * tokens / r["median_s"] / 1e12)
        rows.append(row)
    if peer is not None and "error" not in peer:
        rows[0]["ratio"] = peer["median_s"] / ours["median_s"]
    c = config
    head = (f"LoRA train step: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.n_routed_experts} experts "
            f"top-{c.num_experts_per_tok}, vocab {c.vocab_size}, batch {a.batch} x seq {seq}, r={a.rank} "
            f"(experts {lcfg.expert_rank(c.num_experts_per_tok)}), remat {'on' if remat else 'off'}, {dtype}, "
            f"{dev.device_kind} ({platform})")
    fl = (f"model FLOPs per token {flops['total'] / 1e9:.4g} G = linear 4 x N_active {flops['linear'] / 1e9:.4g} "
          f"(N_active {flops['n_active'] / 1e6:,.1f} M) + attention {flops['attention'] / 1e9:.4g} + adapters "
          f"{flops['adapters'] / 1e9:.4g}; {flops['total'] * tokens / 1e12:.4g} TFLOP per step")
    threads = f"XLA CPU threads {os.cpu_count()}"
    if use_peer:
        import torch

        threads += f", torch threads {torch.get_num_threads()} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})"
    timing = (f"medians of {iters} timed steps after {warmup} untimed, "
              + ("ours and the peer interleaved step by step" if interleave else "each side timed on its own")
              + f"; {threads}")
    lines = table(rows, gpu_peak)
    print(head)
    print(timing)
    print(fl)
    print(f"first step (compile included): ours {ours['compile_s']:.1f} s"
          + ("" if peer is None or "error" in peer else f", peer {peer['compile_s']:.1f} s"))
    print("\n".join(lines), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"config": head, "timing": timing, "flops_per_token": flops, "check": msg,
                                            "rows": rows},
                                           indent=2) + "\n")
    if a.markdown:
        with open(a.markdown, "a", encoding="utf-8") as f:
            f.write(f"\n### train step (LoRA)\n\n{head}\n\n{timing}\n\n{fl}\n\n{msg}\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
