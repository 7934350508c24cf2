"""Benchmark of the routed-expert grouped matmul (PERFORMANCE.md §7.2-7.3): our Pallas kernel against its peers.

    python benchmarks/moe_gmm.py                 # Small 4 shapes (E=128, top-4, H=4096, F=2048) on a GPU
    python benchmarks/moe_gmm.py --small         # tiny shapes: a smoke test that runs on a CPU (interpret mode)
    python benchmarks/moe_gmm.py --json out.json # also write every measurement as JSON ($OUT/moe_gmm.json by default)
    python benchmarks/moe_gmm.py --cpu           # the CPU expert paths (tiled / dense / ragged_dot) at the medium
                                                 # serving config (E=16, top-4, H=F=512, fp32), level B only

Level A (one projection: gate_up K=H N=2F, down K=F N=H) for tokens T in {1, 8, 64, 512, 4096, 16384} (M = 4T rows)
and routings uniform / skewed (Zipf 1.2) / four (every token to the same four experts, the rest empty); passes
forward and dx (the input gradient: gmm with the transposed weights). Peers in this process:

    pallas          small4_jax.kernels.gmm (the kernel under test)
    pallas_fp8      the same on fp8 experts (per-expert scales), tiles dequantised in the kernel (forward only)
    pallas_w8a8     the same fp8 experts with the rows quantised to fp8 too (W8A8, a static scale; forward only):
                    against pallas_fp8 it says whether W8A8 is worth being the default (quant.py, README)
                    (both off with --small unless --quant-peers: interpret mode is slow; their GB/s counts the
                    row's bf16 bytes, so compare their times)
    ragged_dot      jax.lax.ragged_dot, default lowering (run only where it fits; failures are recorded)
    ragged_triton   the same under jax_ragged_dot_use_gpu_pallas_triton_lowering (GPU, when the flag exists)
    gshard          dense one-hot dispatch to [G, C, K] with C = the largest group (dropless), batched einsum
    dense           one [M, K] @ [K, N] matmul of equal FLOPs: the upper bound
    torch_grouped   torch._grouped_mm on the same sorted rows (CUDA only, when torch is installed)

Level B (the routed-expert block: sort, gate_up, SwiGLU, down, combine) for the same T: `moe.routed_experts` with
impl pallas / ragged_dot (with --cpu: tiled / dense / ragged_dot, the expert weights passed as arguments as the
serving engine passes them), against transformers' `Mistral4Experts` (eager and grouped_mm) when torch is present.

Every case is checked before it is timed, on random normal data (never zeros): sampled rows of 8 groups against a
float32 reference (relative error < 1e-2 in bf16); any NaN fails. Time is the median of --iters runs after a warm-up.
TF/s counts real FLOPs (2 M K N); GB/s counts the minimal bytes (the touched experts' weights + activations in and
out); the floors are the GPU's spec peak (bf16 dense) and HBM bandwidth, and the dense matmul measured here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from small4_jax.quant import formats as quant  # noqa: E402
from small4_jax.kernels import gmm  # noqa: E402
from small4_jax.nn.moe import routed_experts  # noqa: E402

PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}  # bf16 dense TF/s, HBM B/s (spec)


def routing(kind: str, tokens: int, experts: int, top_k: int, rng) -> np.ndarray:
    """Expert ids [T, k], distinct per token."""
    if kind == "four":
        return np.tile(np.arange(top_k), (tokens, 1)).astype(np.int32)
    p = np.ones(experts) if kind == "uniform" else 1.0 / np.arange(1, experts + 1) ** 1.2
    p = p / p.sum()
    return np.stack([rng.choice(experts, top_k, replace=False, p=p) for _ in range(tokens)]).astype(np.int32)


def timed(fn, args, iters: int):
    out = jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def check(out, lhs, w, sizes, transpose, rng, what):
    """Sampled rows of up to 8 non-empty groups against float32 lhs_rows @ w[g]; NaN anywhere fails."""
    out = np.asarray(jnp.asarray(out, jnp.float32))
    if np.isnan(out).any():
        raise AssertionError(f"{what}: NaN in the output")
    ends = np.cumsum(sizes)
    groups = [g for g in np.nonzero(sizes)[0]]
    worst = 0.0
    for g in rng.permutation(groups)[:8]:
        rows = np.arange(ends[g] - sizes[g], ends[g])[:32]
        wg = np.asarray(jnp.asarray(w[g], jnp.float32))
        ref = np.asarray(jnp.asarray(lhs[rows], jnp.float32)) @ (wg.T if transpose else wg)
        worst = max(worst, float(np.abs(out[rows] - ref).max() / (np.abs(ref).max() + 1e-30)))
    if worst > 1e-2:
        raise AssertionError(f"{what}: relative error {worst:.2e} > 1e-2")
    return worst


def gshard(lhs, w, gids, capacity):
    """Dropless one-hot dispatch: slot of each row within its group, [G, C, K] buffer, batched matmul, combine."""
    g = w.shape[0]
    onehot = jax.nn.one_hot(gids, g, dtype=jnp.int32)  # [M, G]
    slot = (jnp.cumsum(onehot, axis=0) - 1) * onehot
    dispatch = (jax.nn.one_hot(slot, capacity, dtype=lhs.dtype) * onehot[..., None].astype(lhs.dtype))  # [M, G, C]
    buf = jnp.einsum("mgc,mk->gck", dispatch, lhs)
    y = jnp.einsum("gck,gkn->gcn", buf, w)
    return jnp.einsum("mgc,gcn->mn", dispatch, y)


def level_a(args, dev, rng, results):
    e, k, h, f = args.experts, args.top_k, args.hidden, args.intermediate
    dtype = args.dtype
    on_gpu = dev.platform == "gpu"
    torch = _torch() if on_gpu else None
    flag = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
    has_flag = on_gpu and hasattr(jax.config, flag)
    for proj, kk, nn in (("gate_up", h, 2 * f), ("down", f, h)):
        w = jnp.asarray(rng.standard_normal((e, kk, nn), np.float32) / math.sqrt(kk), dtype)
        wq = quant.quantize(w.astype(jnp.float32), "fp8")  # per-expert scales, as the release
        w_fp8 = quant.dequantize(wq, jnp.float32)  # what the fp8 peers compute with (their checks' reference)
        for tokens in args.tokens:
            for kind in args.routings:
                ids = routing(kind, tokens, e, k, rng)
                flat = ids.reshape(-1)
                order = np.argsort(flat, kind="stable")
                sizes = np.bincount(flat, minlength=e).astype(np.int32)
                gids = jnp.asarray(flat[order])
                m = flat.size
                lhs = jnp.asarray(rng.standard_normal((m, kk), np.float32), dtype)
                dy = jnp.asarray(rng.standard_normal((m, nn), np.float32), dtype)
                gs = jnp.asarray(sizes)
                touched = int((sizes > 0).sum())
                flops = 2.0 * m * kk * nn
                nbytes = 2.0 * (touched * kk * nn + m * kk + m * nn)
                s_x = jnp.max(jnp.abs(lhs.astype(jnp.float32))) / quant.FP8_MAX  # one static scale for every expert
                act = jnp.full((e, 1, 1), s_x, jnp.float32)
                lhs_fp8 = quant.quantize_act(lhs, s_x).astype(jnp.float32) * s_x  # the rows W8A8 multiplies
                for pas in ("fwd", "dx"):
                    x_in, w_t, transpose = (lhs, w, False) if pas == "fwd" else (dy, w, True)
                    peers = {
                        "pallas": (jax.jit(lambda a, b, s, t=transpose: gmm(a, b, s, transpose_rhs=t)), (x_in, w_t, gs)),
                        "ragged_dot": (jax.jit(lambda a, b, s, t=transpose: jax.lax.ragged_dot(
                            a, jnp.swapaxes(b, 1, 2) if t else b, s)), (x_in, w_t, gs)),
                        "dense": (jax.jit(lambda a, b, t=transpose: a @ (b[0].T if t else b[0])), (x_in, w_t)),
                    }
                    capacity = int(sizes.max())
                    if pas == "fwd" and m * e * capacity <= args.gshard_max:
                        peers["gshard"] = (jax.jit(lambda a, b, g, c=capacity: gshard(a, b, g, c)), (x_in, w_t, gids))
                    if pas == "fwd" and args.quant_peers:  # peers with their own check reference (rows, weights)
                        peers["pallas_fp8"] = (jax.jit(lambda a, v, c, s: gmm(a, quant.QArray(v, c), s)),
                                               (x_in, wq.values, wq.scale, gs), (lhs, w_fp8))
                        peers["pallas_w8a8"] = (jax.jit(lambda a, v, c, t, s: gmm(a, quant.QArray(v, c, t), s)),
                                                (x_in, wq.values, wq.scale, act, gs), (lhs_fp8, w_fp8))
                    if has_flag and pas == "fwd":
                        peers["ragged_triton"] = ("flag", (x_in, w_t, gs))
                    if torch is not None and pas == "fwd":
                        peers["torch_grouped"] = ("torch", None)
                    row = dict(level="A", proj=proj, pass_=pas, tokens=tokens, routing=kind, m=m, k=kk, n=nn,
                               touched_experts=touched, flops=flops, bytes=nbytes, impls={})
                    for name, (fn, fargs, *ref) in peers.items():
                        ref_x, ref_w = ref[0] if ref else (x_in, w_t)
                        try:
                            if fn == "flag":
                                jax.config.update(flag, True)
                                try:
                                    out, t = timed(jax.jit(lambda a, b, s: jax.lax.ragged_dot(a, b, s)), fargs,
                                                   args.iters)
                                finally:
                                    jax.config.update(flag, False)
                            elif fn == "torch":
                                out, t = _torch_grouped(torch, lhs, w, sizes, args.iters)
                            else:
                                out, t = timed(fn, fargs, args.iters)
                            err = None if name == "dense" else check(out, ref_x, ref_w, sizes, transpose, rng,
                                                                     f"{proj} {pas} T={tokens} {kind} {name}")
                            row["impls"][name] = dict(time_s=t, rel_err=err)
                        except AssertionError:
                            raise
                        except Exception as ex:  # OOM, unsupported lowering: recorded, not fatal
                            row["impls"][name] = dict(error=f"{type(ex).__name__}: {str(ex)[:120]}")
                    results.append(row)
                    _print_row(row, dev)


def level_b(args, dev, rng, results):
    e, k, h, f = args.experts, args.top_k, args.hidden, args.intermediate
    dtype = args.dtype
    gate_up = jnp.asarray(rng.standard_normal((e, h, 2 * f), np.float32) / math.sqrt(h), dtype)
    down = jnp.asarray(rng.standard_normal((e, f, h), np.float32) / math.sqrt(f), dtype)
    hf = _hf_experts(gate_up, down, args) if _torch() is not None else {}
    for tokens in args.tokens:
        ids = routing("uniform", tokens, e, k, rng)
        wts = rng.random((tokens, k)).astype(np.float32)
        wts /= wts.sum(1, keepdims=True)
        x = jnp.asarray(rng.standard_normal((tokens, h), np.float32), dtype)
        ref = routed_experts(x.astype(jnp.float32), jnp.asarray(ids), jnp.asarray(wts), gate_up.astype(jnp.float32),
                             down.astype(jnp.float32), impl="ragged_dot" if tokens * e <= 2 ** 20 else "pallas")
        row = dict(level="B", proj="block", pass_="fwd", tokens=tokens, routing="uniform", m=tokens * k,
                   flops=2.0 * tokens * k * 3 * h * f, bytes=2.0 * (int(len(np.unique(ids))) * 3 * h * f + 2 * tokens * h),
                   impls={})
        for impl in args.block_impls:
            try:
                fn = jax.jit(lambda x, i, w, a, b, impl=impl: routed_experts(x, i, w, a, b, impl=impl))
                out, t = timed(fn, (x, jnp.asarray(ids), jnp.asarray(wts), gate_up, down), args.iters)
                err = _rel(out, ref)
                if not err < 2e-2:
                    raise AssertionError(f"block T={tokens} {impl}: relative error {err:.2e}")
                row["impls"][impl] = dict(time_s=t, rel_err=err)
            except AssertionError:
                raise
            except Exception as ex:
                row["impls"][impl] = dict(error=f"{type(ex).__name__}: {str(ex)[:120]}")
        for name, module in hf.items():
            try:
                out, t = _torch_block(module, x, ids, wts, args.iters)
                row["impls"][name] = dict(time_s=t, rel_err=_rel(out, ref))
            except Exception as ex:
                row["impls"][name] = dict(error=f"{type(ex).__name__}: {str(ex)[:120]}")
        results.append(row)
        _print_row(row, dev)


def _rel(out, ref):
    out, ref = np.asarray(jnp.asarray(out, jnp.float32)), np.asarray(ref, np.float32)
    return float(np.abs(out - ref).max() / (np.abs(ref).max() + 1e-30))


# ----------------------------------------------------------------------------------------------------------------------
# torch peers (optional).
def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _torch_grouped(torch, lhs, w, sizes, iters):
    if not hasattr(torch, "_grouped_mm"):
        raise RuntimeError("torch._grouped_mm is not available")
    a = torch.from_dlpack(lhs).cuda()
    b = torch.from_dlpack(w).cuda()
    offs = torch.tensor(np.cumsum(sizes), dtype=torch.int32, device="cuda")
    out = torch._grouped_mm(a, b, offs=offs)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch._grouped_mm(a, b, offs=offs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return jnp.asarray(out.float().cpu().numpy()), statistics.median(times)


def _hf_experts(gate_up, down, args):
    """transformers' Mistral4Experts with our weights, per experts_implementation that builds."""
    torch = _torch()
    try:
        from transformers import Mistral4Config
        from transformers.models.mistral4.modeling_mistral4 import Mistral4Experts
    except ImportError:
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for impl in ("eager", "grouped_mm"):
        try:
            cfg = Mistral4Config(hidden_size=args.hidden, moe_intermediate_size=args.intermediate,
                                 n_routed_experts=args.experts, num_experts_per_tok=args.top_k)
            cfg._experts_implementation = impl
            mod = Mistral4Experts(cfg).to(device=device, dtype=getattr(torch, jnp.dtype(args.dtype).name))
            with torch.no_grad():
                mod.gate_up_proj.copy_(torch.tensor(np.asarray(gate_up.astype(jnp.float32))).transpose(1, 2))
                mod.down_proj.copy_(torch.tensor(np.asarray(down.astype(jnp.float32))).transpose(1, 2))
            out[f"hf_{impl}"] = mod
        except Exception as ex:  # noqa: BLE001 - an implementation this transformers/torch cannot build
            print(f"# transformers experts_implementation={impl}: not available ({type(ex).__name__})")
    return out


def _torch_block(module, x, ids, wts, iters):
    torch = _torch()
    device, dtype = next(module.parameters()).device, next(module.parameters()).dtype
    xt = torch.from_numpy(np.array(x.astype(jnp.float32))).to(device=device, dtype=dtype)
    it = torch.from_numpy(ids.astype(np.int64)).to(device)
    wt = torch.from_numpy(wts).to(device=device, dtype=dtype)
    with torch.no_grad():
        out = module(xt, it, wt)
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            module(xt, it, wt)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return jnp.asarray(out.float().cpu().numpy()), statistics.median(times)


# ----------------------------------------------------------------------------------------------------------------------
# Output.
def _peaks(dev):
    for name, peaks in PEAKS.items():
        if name in getattr(dev, "device_kind", ""):
            return peaks
    return None


def _print_row(row, dev):
    peaks = _peaks(dev)
    dense = row["impls"].get("dense", {}).get("time_s")
    mine = "pallas" if "pallas" in row["impls"] else "tiled"  # the implementation under test
    ours = row["impls"].get(mine, {}).get("time_s")
    head = f"{row['level']} {row['proj']:7s} {row['pass_']:3s} T={row['tokens']:<6d} {row['routing']:7s}"
    for name, r in row["impls"].items():
        if "error" in r:
            print(f"{head} {name:14s} {'-':>10s}  {r['error']}")
            continue
        t = r["time_s"]
        tf, gb = row["flops"] / t / 1e12, row["bytes"] / t / 1e9
        extra = ""
        if peaks:
            extra += f" {100 * tf * 1e12 / peaks[0]:5.1f}%peakTF {100 * gb * 1e9 / peaks[1]:5.1f}%HBM"
        if dense and name != "dense":
            extra += f" {dense / t:5.2f}x-dense"
        if ours and name != mine:
            extra += f"  {mine} speedup {t / ours:6.2f}x"
        err = "" if r.get("rel_err") is None else f" err {r['rel_err']:.1e}"
        print(f"{head} {name:14s} {t * 1e3:9.3f}ms {tf:8.3f}TF/s {gb:8.1f}GB/s{extra}{err}")
    sys.stdout.flush()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes; runs on a CPU in Pallas interpret mode")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--routings", nargs="*", default=["uniform", "skewed", "four"])
    p.add_argument("--levels", nargs="*", default=["A", "B"])
    p.add_argument("--json", default=None, help="write results here (default $OUT/moe_gmm.json when $OUT is set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="the CPU expert paths at the medium serving config (level B)")
    p.add_argument("--quant-peers", action=argparse.BooleanOptionalAction, default=None,
                   help="the pallas_fp8 / pallas_w8a8 peers of level A (default: on, off with --small)")
    args = p.parse_args(argv)
    if args.quant_peers is None:
        args.quant_peers = not args.small
    args.dtype, args.block_impls = jnp.bfloat16, ("pallas", "ragged_dot")
    if args.cpu:
        args.experts, args.top_k, args.hidden, args.intermediate = 16, 4, 512, 512
        args.tokens = args.tokens or [1, 16, 64, 256, 1024]
        args.iters = args.iters or 7
        args.levels, args.dtype, args.block_impls = ["B"], jnp.float32, ("tiled", "dense", "ragged_dot")
    elif args.small:
        args.experts, args.top_k, args.hidden, args.intermediate = 16, 4, 64, 32
        args.tokens = args.tokens or [1, 8, 64]
        args.iters = args.iters or 2
    else:
        args.experts, args.top_k, args.hidden, args.intermediate = 128, 4, 4096, 2048
        args.tokens = args.tokens or [1, 8, 64, 512, 4096, 16384]
        args.iters = args.iters or 20
    args.gshard_max = 2 ** 31 // 8
    dev = jax.devices()[0]
    print(f"# device {dev.device_kind} ({dev.platform}), jax {jax.__version__}; E={args.experts} top-{args.top_k} "
          f"H={args.hidden} F={args.intermediate}; {jnp.dtype(args.dtype).name}; median of {args.iters}")
    if dev.platform != "gpu" and "pallas" in args.block_impls:
        print("# not a GPU: the Pallas kernel runs in interpret mode; times here say nothing about GPU speed")
    rng = np.random.default_rng(args.seed)
    print("# level proj pass tokens routing impl  median  TF/s(real FLOPs)  GB/s(touched experts + activations)  "
          "[% of spec peak TF / HBM]  [x of the dense matmul's TF/s]  [pallas speedup = peer time / pallas time]")
    results = []
    if "A" in args.levels:
        level_a(args, dev, rng, results)
    if "B" in args.levels:
        level_b(args, dev, rng, results)
    path = args.json or (os.path.join(os.environ["OUT"], "moe_gmm.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(dict(device=dev.device_kind, jax=jax.__version__, results=results), indent=1))
        print(f"# wrote {path}")
    return results


if __name__ == "__main__":
    main()
