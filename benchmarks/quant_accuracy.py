"""Accuracy of the quantised formats on a tiny model fine-tuned by our own trainer, and QLoRA against LoRA (CPU).

    python benchmarks/quant_accuracy.py [--steps 100] [--out runs/quant-accuracy]

1. LoRA: `train.trainer.train` on configs/finetune-tiny.yaml (the demo data) with a float32 base; the adapters are
   merged into the base (`lora.merge_into`), giving a fine-tuned tiny model.
2. That model quantised to each `quantize=` spelling (`qlinear.quantize_model`: "int4" is the routed experts in int4
   and the dense linears in int8, "int4-all" int4 everywhere), and their int4 parts by GPTQ ("...-gptq", calibrated on
   the fine-tuning config's eval split, data/demo_eval.jsonl: conversations that are not the prompts measured
   below). Logit metrics, float32 compute (the weight format alone differs), relative error = Frobenius norm
   ||q - ref|| / ||ref|| over the whole [B, T, V] logits (centring each row first changes it by < 1e-4 here, so a
   shared offset does not hide error): `logits_rel` on random-token prompts (out of the tuned domain: the most
   sensitive inputs), `domain_logits_rel` teacher-forced over the domain prompts followed by the float model's
   own answers, with `domain_kl` (mean KL(ref || q) per answer position) and `domain_top1` (the fraction of
   answer positions whose argmax agrees). Then the greedy
   agreement over 64 generated tokens (the fraction of positions where the quantised model's greedy token equals
   the float model's, each continuing its own text; a first disagreement usually ends agreement). Agreement is
   measured twice: on the fine-tuning set's own user turns (the domain the model was tuned for: each answer runs
   to EOS; a position past the shorter answer counts as a disagreement), and on random-token prompts, where a tiny
   model's logits are near-ties and any weight noise flips them (reported for completeness).
3. QLoRA: the same run over a frozen fp8 / int4 / int4-all base (`base.quantize`; `--qlora-only`: only this step);
   its loss curve against LoRA's: the ratio
   of the mean losses over the run (the curves' areas), the mean over steps of |loss_q - loss| / loss (dominated by
   step-to-step noise once the loss is near zero), and the final losses.

Output: JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(cfg, out: Path, quantize: str | None) -> list[dict]:
    from train.trainer import train

    cfg = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, quantize=quantize),
                              train=dataclasses.replace(cfg.train, out_dir=str(out)))
    train(cfg)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def qlora(cfg, out: Path, ref_curve: dict[int, float]) -> None:
    """Step 3: the same fine-tuning over a frozen quantised base, each curve against LoRA's."""
    for fmt in ("fp8", "int4", "int4-all"):
        curve = losses(run(cfg, out / f"qlora-{fmt}", fmt))
        steps = sorted(set(curve) & set(ref_curve))
        dev = float(np.mean([abs(curve[s] - ref_curve[s]) / ref_curve[s] for s in steps]))
        area = sum(curve[s] for s in steps) / sum(ref_curve[s] for s in steps)  # mean loss, QLoRA / LoRA
        print(json.dumps(dict(qlora=fmt, mean_rel_loss_diff=dev, mean_loss_ratio=area, final_loss=curve[steps[-1]],
                              final_loss_lora=ref_curve[steps[-1]], steps=len(steps))), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "finetune-tiny.yaml"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="runs/quant-accuracy")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=16, help="fine-tuning rows whose user turns are the domain prompts")
    p.add_argument("--no-qlora", action="store_true", help="skip the QLoRA runs")
    p.add_argument("--qlora-only", action="store_true", help="only the LoRA run and the QLoRA runs (step 3)")
    a = p.parse_args(argv)

    from small4_jax.quant import formats as quant
    from small4_jax.decode.generation import generate
    from small4_jax.lora.adapters import merge_into
    from small4_jax.nn.model import init_model
    from small4_jax.nn.qlinear import quantize_model
    from small4_jax.inputs.tokenizer import load_tokenizer
    from train.data import encode_row, prompt_ids, read_jsonl
    from train import config as run_config
    from train.export import load_run

    cfg = run_config.load(a.config)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=a.steps))
    out = Path(a.out)
    ref_curve = losses(run(cfg, out / "lora", None))
    if a.qlora_only:
        qlora(cfg, out, ref_curve)
        return 0
    model, rcfg, _ = load_run(out / "lora")
    plain = merge_into(init_model(rcfg.model, seed=rcfg.base.seed, dtype="float32"), model)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, rcfg.model.vocab_size, 16)) for _ in range(4)]
    ids = jnp.asarray(np.array(prompts, np.int32))
    tok = load_tokenizer(rcfg.base.tokenizer)
    train_file = Path(rcfg.data.train[0])
    train_file = train_file if train_file.is_absolute() else ROOT / train_file
    rows = [json.loads(x) for x in train_file.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "messages" in r][: a.prompts]
    domain = [prompt_ids(tok, [m for m in r["messages"] if m["role"] == "user"][:1]) for r in rows]
    stop = (tok.eos_id,)

    def agreement(m, ref_gens, prs, stop_ids):
        gens = [generate(m, pr, max_new_tokens=a.tokens, stop_ids=stop_ids) for pr in prs]
        return float(np.mean([np.mean([i < len(g) and g[i] == t for i, t in enumerate(r)])
                              for g, r in zip(gens, ref_gens)]))

    ref_logits = np.asarray(plain(ids))
    ref_gen = [generate(plain, pr, max_new_tokens=a.tokens) for pr in prompts]
    ref_domain = [generate(plain, pr, max_new_tokens=a.tokens, stop_ids=stop) for pr in domain]
    seqs = [list(pr) + list(g) for pr, g in zip(domain, ref_domain)]
    ref_seq = [np.asarray(plain(jnp.asarray([s], jnp.int32)))[0] for s in seqs]
    cal = [encode_row(r, tok)[0] for _, _, r in read_jsonl(
        [f if Path(f).is_absolute() else ROOT / f for f in rcfg.data.eval])[0]]

    def teacher_forced(m):
        got = [np.asarray(m(jnp.asarray([s], jnp.int32)))[0] for s in seqs]
        ans = [slice(len(pr) - 1, None) for pr in domain]
        kl = [np.sum(np.exp(lp) * (lp - lq), -1).mean() for lp, lq in
              ((np.asarray(jax.nn.log_softmax(r[s])), np.asarray(jax.nn.log_softmax(g[s])))
               for g, r, s in zip(got, ref_seq, ans))]
        return dict(domain_logits_rel=float(np.linalg.norm(np.concatenate(got) - np.concatenate(ref_seq))
                                            / np.linalg.norm(np.concatenate(ref_seq))),
                    domain_kl=float(np.mean(kl)),
                    domain_top1=float(np.mean([np.mean(g[s].argmax(-1) == r[s].argmax(-1))
                                               for g, r, s in zip(got, ref_seq, ans)])))

    for fmt in quant.SPELLINGS + ("int4-gptq", "int4-gptq-act-order", "int4-all-gptq"):
        q = merge_into(init_model(rcfg.model, seed=rcfg.base.seed, dtype="float32"), model)
        if "-gptq" in fmt:
            from small4_jax.quant.calibration import quantize_in_memory

            quantize_in_memory(q, cal, quantize=fmt.split("-gptq")[0], act_order=fmt.endswith("act-order"))
        else:
            quantize_model(q, fmt)
        logits = np.asarray(q(ids))
        rel = float(np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits))
        print(json.dumps(dict(format=fmt, logits_rel=rel, **teacher_forced(q), tokens=a.tokens,
                              greedy_agreement_domain=agreement(q, ref_domain, domain, stop),
                              domain_prompts=len(domain), calibration_sequences=len(cal) if "gptq" in fmt else 0,
                              greedy_agreement_random=agreement(q, ref_gen, prompts, ()))), flush=True)
    if not a.no_qlora:
        qlora(cfg, out, ref_curve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
