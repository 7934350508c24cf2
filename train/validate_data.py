"""Check a fine-tuning dataset before spending accelerator time on it.

    python -m train.validate_data --config configs/finetune-tiny.yaml

Reads every train and eval JSONL file of the config, reports each bad row as `file:line: reason` (bad JSON,
unknown role, last message not the assistant's, malformed tool calls, empty files, ...), then tokenises with the
run's tokenizer and prints rows, tokens, trained tokens, packed rows, epochs and an ETA for the configured steps.
With `train.method: dpo` the rows are preference pairs (train/dpo.py), with `grpo` prompts (train/grpo.py).
Exits 1 when any row is bad (nothing is tokenised or trained), 2 for a bad config.
"""

from __future__ import annotations

import argparse
import sys

from small4_jax.console import cli_main
from small4_jax.errors import Small4Error

DEFAULT_TOKENS_PER_S = 2000.0  # rough CPU figure for the tiny model; set train.expected_tokens_per_s for a real run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.validate_data", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="run config YAML")
    args = p.parse_args(argv)
    try:
        from train import config as run_config
        from train.data import DataError, load_dataset, read_jsonl
        from train.trainer import load_tokenizer

        cfg = run_config.load(args.config)
        files = list(cfg.data.train) + list(cfg.data.eval)
        method, validate = _method(cfg)
        rows, errors = read_jsonl(files, validate=validate)
        if errors:
            for e in errors:
                print(e)
            print(f"{len(errors)} bad row(s) in {len(files)} file(s); {len(rows)} good row(s). Fix them before "
                  "training.", file=sys.stderr)
            return 1
        if method is not None:  # preference pairs (train/dpo.py) or prompts (train/grpo.py)
            return _summarise(cfg, method)
        tokenizer = load_tokenizer(cfg)
        try:
            _, stats = load_dataset(cfg.data.train, tokenizer, cfg.data.seq_len, cfg.data.seed)
        except DataError as e:  # rows that cannot be tokenised or would train on nothing, one per line
            print("\n".join(x.strip() for x in str(e).splitlines()[1:]))
            print(f"{str(e).splitlines()[0]} Fix them before training.", file=sys.stderr)
            return 1
        t = cfg.train
        step_tokens = t.batch_size * cfg.data.seq_len
        epochs = t.steps * t.batch_size / max(stats.packed_rows, 1)
        rate = t.expected_tokens_per_s or DEFAULT_TOKENS_PER_S
        eta = t.steps * step_tokens / rate
        print(f"train: {stats.files} file(s), {stats.rows} rows, {stats.tokens:,} tokens ({stats.train_tokens:,} in "
              f"the loss), {stats.packed_rows} packed rows of {cfg.data.seq_len}, {stats.truncated} truncated")
        if cfg.data.eval:
            _, ev = load_dataset(cfg.data.eval, tokenizer, cfg.data.seq_len, cfg.data.seed)
            print(f"eval: {ev.rows} rows, {ev.tokens:,} tokens, {ev.packed_rows} packed rows")
        source = "train.expected_tokens_per_s" if t.expected_tokens_per_s else "a rough default"
        print(f"run: {t.steps} steps x {t.batch_size} rows = {epochs:.1f} epochs; ETA ~{eta / 60:.1f} min at "
              f"{rate:,.0f} tokens/s ({source})")
    except Small4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _method(cfg):
    """(None, SFT's row check), or the module of train.method dpo / grpo and its row check."""
    from train.data import validate_row

    if cfg.train.method == "dpo":
        from train import dpo

        return dpo, dpo.validate_pair
    if cfg.train.method == "grpo":
        from train import grpo

        return grpo, grpo.validate_prompt
    return None, validate_row


def _summarise(cfg, method) -> int:
    """validate_data's counts for train.method dpo / grpo (rows that cannot be used: file:line: reason)."""
    from train.data import DataError
    from train.trainer import load_tokenizer

    try:
        summary = method.data_summary(cfg, load_tokenizer(cfg))
    except DataError as e:
        print("\n".join(x.strip() for x in str(e).splitlines()[1:]))
        print(f"{str(e).splitlines()[0]} Fix them before training.", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
