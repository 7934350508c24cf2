"""Generate text from a prompt with Mistral Small 4 (or a tiny random model of the same architecture).

    python -m infer.generate --config configs/tiny.yaml --prompt "Hello"            # random weights, bundled tokenizer
    python -m infer.generate --checkpoint /models/Mistral-Small-4 --prompt "Hello"  # real weights (HF or native dir)

Text is streamed to stdout as tokens arrive; `--json` adds one last line `{"token_ids": [...], "text": "..."}`.
Errors in the input (a bad checkpoint, an empty or too long prompt) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from small4_jax.errors import InputError, Small4Error


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML preset (random weights from --seed), e.g. configs/tiny.yaml")
    src.add_argument("--checkpoint", help="checkpoint directory (HF config.json or native params.json + safetensors)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (BOS is added)")
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids, used as given, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="random init (with --config) and sampling")
    p.add_argument("--dtype", default=None, help="parameter dtype: float32 or bfloat16 (default: float32 for --config; "
                   "for --checkpoint, float32 if the checkpoint is float32, else bfloat16)")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the checkpoint's, or the bundled tiny one)")
    p.add_argument("--mesh", help="device mesh, e.g. data=1,expert=8,tensor=1 (default: one device)")
    p.add_argument("--json", action="store_true", help='print a last line {"token_ids": [...], "text": "..."}')
    return p.parse_args(argv)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise InputError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise InputError("empty prompt: --prompt-ids has no ids")
    return ids


def _parse_mesh(text: str | None):
    if not text:
        return None
    from small4_jax.sharding import make_mesh

    shape = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not name or not size.isdigit():
            raise InputError(f"--mesh: expected name=size pairs like data=1,expert=8, got {text!r}")
        shape[name.strip()] = int(size)
    try:
        return make_mesh(shape)
    except Exception as e:  # jax explains why (device count, ...)
        raise InputError(f"--mesh {text}: {e}") from None


def run(args: argparse.Namespace) -> dict:
    from small4_jax.checkpoint import from_pretrained
    from small4_jax.config import Small4Config
    from small4_jax.generation import generate
    from small4_jax.model import init_model
    from small4_jax.sampling import SamplingParams
    from small4_jax.tokenizer import StreamDecoder, default_tokenizer, load_tokenizer

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.max_new_tokens <= 0:
        raise InputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.prompt is not None and args.prompt == "":
        raise InputError("empty prompt: --prompt is empty")
    prompt_ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
    mesh = _parse_mesh(args.mesh)

    t0 = time.time()
    if args.config:
        config = Small4Config.from_yaml(args.config)
        model = init_model(config, seed=args.seed, dtype=args.dtype or "float32")
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else default_tokenizer()
        print(
            f"note: the weights are RANDOM ({args.config}, seed {args.seed}), so the text is gibberish. "
            "For real text pass --checkpoint DIR with a Mistral Small 4 checkpoint (HF or Mistral-native).",
            file=sys.stderr,
        )
    else:
        model = from_pretrained(args.checkpoint, dtype=args.dtype or "auto", mesh=mesh)
        config = model.config
        tokenizer = None
        try:
            tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
        except Small4Error:
            if args.tokenizer or prompt_ids is None:
                raise
    logging.getLogger("small4_jax").info("model ready in %.1fs", time.time() - t0)

    if prompt_ids is None:
        prompt_ids = tokenizer.encode(args.prompt, bos=True)
    stop_ids = config.eos_token_id if isinstance(config.eos_token_id, tuple) else (config.eos_token_id,)
    stop_ids = [s for s in stop_ids if s is not None]
    stream = StreamDecoder(tokenizer) if tokenizer is not None else None

    def on_token(t: int):
        if stream is not None:
            sys.stdout.write(stream.push(t))
            sys.stdout.flush()

    ids = generate(
        model, prompt_ids, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
        stop_ids=stop_ids, on_token=on_token,
    )
    if stream is not None:
        sys.stdout.write(stream.flush() + "\n")
    text = tokenizer.decode(ids) if tokenizer is not None else ""
    result = {"token_ids": ids, "text": text}
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    sys.stdout.flush()
    return result


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (it may be replaced, e.g. under pytest)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    log = logging.getLogger("small4_jax")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.INFO)
    try:
        run(args)
    except Small4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
