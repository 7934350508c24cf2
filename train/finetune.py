"""LoRA fine-tuning of Mistral Small 4 (or the tiny model) on mistral-finetune JSONL data: supervised (SFT, the
default), preference (`train.method: dpo`, train/dpo.py) or RL with rollouts from the engine (`grpo`, train/grpo.py).

    python -m train.finetune --config configs/finetune-tiny.yaml             # a fresh run into train.out_dir
    python -m train.finetune --config configs/finetune-tiny.yaml --resume    # continue from the latest checkpoint
    python -m train.finetune --config configs/finetune-small4.yaml --checkpoint /models/Mistral-Small-4-119B-2603

`--checkpoint` overrides base.checkpoint; the runtime flags (--moe-impl, --attn-impl, --softmax-scale, ...) override
the run config's `runtime:` section (small4_jax/runtime.py).

Writes `out_dir/metrics.jsonl` (one record per step: loss, lr, grad_norm, tokens, tokens_per_s, eval_loss), Orbax
checkpoints in `out_dir/checkpoints/`, and a progress line per step on stderr. Bad data, configs or a non-finite
loss print one line `error: ...` and exit with status 2; see train/trainer.py for what is saved and how resume works.
"""

from __future__ import annotations

import argparse
import sys

from small4_jax.console import cli_main
from small4_jax.errors import Small4Error


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.finetune", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="run config YAML (model, lora, data, optim, train)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    p.add_argument("--checkpoint", help="override base.checkpoint: an HF (config.json) or Mistral-native (params.json) "
                   "directory, or a converted sharded one")
    p.add_argument("--out-dir", help="override train.out_dir")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--mesh", help="override train.mesh, e.g. data=2,expert=4,tensor=1")
    p.add_argument("--quantize", metavar="FORMAT",
                   help="override base.quantize: QLoRA over a frozen quantised base: fp8, int8, int4 (routed experts "
                   "int4, dense linears int8), int4-all (int4 everywhere) or none (small4_jax.quant.formats.SPELLINGS)")
    from small4_jax.runtime import add_runtime_args

    add_runtime_args(p)
    args = p.parse_args(argv)
    from small4_jax.console import setup_logging

    setup_logging()
    try:
        import dataclasses

        from small4_jax.parallel import distributed

        distributed.initialize()  # joins a multi-process job when the environment describes one (launch/)
        from train import config as run_config
        from small4_jax.parallel.sharding import parse_mesh
        from train import trainer

        cfg = run_config.load(args.config)
        mesh = None if args.mesh is None else parse_mesh(args.mesh, "--mesh")
        changes = {k: v for k, v in (("out_dir", args.out_dir), ("steps", args.steps), ("mesh", mesh))
                   if v is not None}
        if changes:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
        if args.checkpoint is not None:
            cfg = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, checkpoint=args.checkpoint))
        from small4_jax import runtime

        cfg = dataclasses.replace(cfg, model=cfg.model.with_runtime(runtime.from_args(args, cfg.model.runtime)))
        if args.quantize is not None:
            from small4_jax.quant.formats import check_format

            check_format(args.quantize, "--quantize")
            cfg = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, quantize=args.quantize))
        method = trainer
        if cfg.train.method == "dpo":
            from train import dpo as method  # jax-heavy: loaded after the argument and config checks
        elif cfg.train.method == "grpo":
            from train import grpo as method  # jax-heavy: loaded after the argument and config checks
        method.train(cfg, resume=args.resume)
    except Small4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
