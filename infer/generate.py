"""Generate text from a prompt with Mistral Small 4 (or a tiny random model of the same architecture).

    python -m infer.generate --config configs/tiny.yaml --prompt "Hello"            # random weights, bundled tokenizer
    python -m infer.generate --checkpoint /models/Mistral-Small-4 --prompt "Hello"  # real weights (HF or native dir)

    python -m infer.generate --checkpoint DIR --chat --system "Be brief." --reasoning-effort high --prompt "Hi"
    python -m infer.generate --checkpoint DIR --input prompts.jsonl --output out.jsonl   # batch, progress bar
    python -m infer.generate --checkpoint DIR --lora ADAPTER --prompt "Hi"             # one adapter, every prompt
    python -m infer.generate --checkpoint DIR --lora a=DIR_A --lora b=DIR_B --input prompts.jsonl   # per prompt

`--lora DIR` attaches one PEFT adapter to the model for every prompt. `--lora NAME=DIR` (repeatable) serves several
side by side as the server does (`small4_jax/lora/multi.py`, one batch mixing them): each prompt picks one with
`--adapter NAME` (--prompt / --prompt-ids) or its input line's "adapter"; prompts without a choice use the base model.

Everything runs through the serving engine (`infer/engine/engine.py`). Text is streamed to stdout as tokens arrive
(with --chat, the answer; the reasoning goes to stderr); `--json` adds one last line
`{"token_ids": [...], "text": "..."}` (with --chat also "reasoning_content" and "tool_calls"). The JSONL formats of
--input / --output are in `infer/batch.py`. Errors in the input (a bad checkpoint, an empty or too long prompt, a bad
line, a flag) are checked before the model is built and print one line on stderr, exit status 2. A failed write under
--output (a full disk) stops generation at once with one line naming the file and how many results are safe in it,
exit status 1. Ctrl-C: one line saying what was kept, exit status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from small4_jax.console import cli_main
from small4_jax.errors import InputError, OutputError, Small4Error


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML preset (random weights from --seed), e.g. configs/tiny.yaml")
    src.add_argument("--checkpoint", help="checkpoint directory (HF config.json or native params.json + safetensors)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (BOS is added)")
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids, used as given, e.g. 1,2,3")
    prompt.add_argument("--input", help="JSONL file of prompts (see infer/batch.py); results go to --output")
    p.add_argument("--output", help="JSONL file for the --input results (default: stdout)")
    p.add_argument("--chat", action="store_true", help="format --prompt as a user turn of the chat template")
    p.add_argument("--system", help="system prompt (implies --chat)")
    p.add_argument("--reasoning-effort", choices=("none", "high"), help="reasoning mode (implies --chat)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file for the user turn, before the text (repeatable; with --chat)")
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
    from infer.cli import add_engine_args

    add_engine_args(p, max_batch=8)
    p.add_argument("--lora", action="append", default=[], metavar="[NAME=]DIR",
                   help="HF PEFT LoRA adapter directory (train.export --peft), applied without merging to every prompt; "
                   "or NAME=DIR, repeatable: adapters each prompt picks from (--adapter, an input line's \"adapter\")")
    p.add_argument("--adapter", metavar="NAME", help="the --lora NAME=DIR adapter the prompt runs with (default: the base "
                   "model); in --input files each line's \"adapter\" (this is the default for lines without one)")
    return p.parse_args(argv)


def lora_flags(values) -> tuple[str | None, list[tuple[str, str]]]:
    """--lora values -> (one adapter directory for every prompt, or None; [(name, dir)] adapters chosen per prompt).
    A value is NAME=DIR when the part before its first '=' is a name (no path separator), else a directory."""
    from small4_jax.lora.multi import parse_lora_flags

    named = [v for v in values if "=" in v and not any(c in v.partition("=")[0] for c in "/\\")]
    plain = [v for v in values if v not in named]
    if plain and (named or len(plain) > 1):
        raise InputError("--lora: give one adapter DIR (applied to every prompt) or NAME=DIR adapters (each prompt "
                         "picks one), not both, and not several unnamed ones")
    pairs = parse_lora_flags(named)
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"--lora: adapter name {dup[0]!r} given twice")
    return (plain[0] if plain else None), pairs


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise InputError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise InputError("empty prompt: --prompt-ids has no ids")
    return ids


@dataclasses.dataclass
class Plan:
    """What the command line asks for, checked before the model is built (seconds, not the build's minute)."""

    config: object
    tokenizer: object
    mesh: object
    single_lora: str | None  # `--lora DIR`: one adapter for every prompt
    item: object = None  # the one --prompt / --prompt-ids prompt
    writer: object = None  # --input: the results still to write


def run(args: argparse.Namespace) -> dict:
    from infer.cli import engine_kwargs
    from infer.engine.engine import Engine

    plan = check_inputs(args)
    if args.input and not plan.writer.todo:
        plan.writer.close()
        return {"results": []}
    model = build_model(args, plan)
    engine = Engine(model, plan.tokenizer, mesh=plan.mesh, **engine_kwargs(args))
    if args.input:
        result = _run_batch(engine, plan.tokenizer, plan.writer)
    else:
        result = _run_one(engine, plan.tokenizer, plan.item, args.json)
    if engine.speculator is not None:
        m = engine.speculator.metrics()
        print(f"speculative ({args.speculative}): {m['spec_accepted_tokens']} of {m['spec_draft_tokens']} draft tokens "
              f"accepted ({100 * m['spec_acceptance_rate']:.0f}%), {m['spec_mean_accepted_length']:.2f} tokens per "
              "verify step", file=sys.stderr)
    return result


def _check_flags(args: argparse.Namespace) -> tuple[list[int] | None, str | None, list[str]]:
    """The flags that need no model config: (--prompt-ids, the single --lora DIR, the --lora NAME=DIR names)."""
    from small4_jax.lora.adapters import check_peft_dir
    from small4_jax.decode.sampling import SamplingParams

    SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)  # the CLI's checks
    if args.max_new_tokens <= 0:
        raise InputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.prompt is not None and args.prompt == "":
        raise InputError("empty prompt: --prompt is empty")
    if args.output and not args.input:
        raise InputError("--output is for the results of --input; a single prompt prints to stdout")
    if args.image and args.input:
        raise InputError("--image goes with --prompt; in an --input file give image parts in \"messages\"")
    prompt_ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
    single_lora, named_loras = lora_flags(args.lora)
    args.lora_adapters = [f"{n}={d}" for n, d in named_loras]  # the engine's multi-LoRA (infer.cli.engine_kwargs)
    if single_lora:
        check_peft_dir(single_lora, f"--lora {single_lora}")
    names = [n for n, _ in named_loras]
    if args.adapter is not None and args.adapter not in names:
        raise InputError(f"--adapter {args.adapter!r}: not one of the --lora NAME=DIR adapters "
                         f"({', '.join(names) or 'none given'})")
    return prompt_ids, single_lora, names


def check_inputs(args: argparse.Namespace) -> Plan:
    """Everything the input says, checked before the model is built; --output opened (earlier results read)."""
    from infer.batch import ResultWriter, check_length, make_item, read_items
    from infer.cli import preflight
    from infer.engine.engine import MAX_CONTEXT, SamplingOptions
    from small4_jax.console import on_interrupt

    prompt_ids, single_lora, names = _check_flags(args)
    chat = dict(chat=args.chat or bool(args.system or args.reasoning_effort), system=args.system,
                reasoning_effort=args.reasoning_effort, adapter=args.adapter, adapters=names)
    config, tokenizer, mesh = preflight(args, need_tokenizer=prompt_ids is None)  # --lora NAME=DIR, --speculative
    if tokenizer is None and chat["chat"]:
        raise InputError("--chat needs a tokenizer: pass --tokenizer (a tekken.json)")
    if prompt_ids is not None:
        bad = [t for t in prompt_ids if not 0 <= t < config.vocab_size]
        if bad:
            raise InputError(f"--prompt-ids: ids {bad[:5]} are outside the vocabulary [0, {config.vocab_size})")
    defaults = SamplingOptions(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed)
    max_len = args.max_model_len or min(config.max_position_embeddings, MAX_CONTEXT)
    plan = Plan(config, tokenizer, mesh, single_lora)
    if args.input:
        items = read_items(args.input, tokenizer, defaults, vocab_size=config.vocab_size, max_len=max_len, **chat)
        plan.writer = writer = ResultWriter(args.output, items, args.input)
        if writer.skipped:
            print(f"{args.output}: {writer.skipped} of {len(items)} results already there; "
                  f"{len(writer.todo)} to go", file=sys.stderr)
        if args.output:
            on_interrupt(lambda: f"{writer.written} of {len(items)} results are in {args.output}; a rerun with "
                                 "the same --output skips them")
        return plan
    source = {"prompt_ids": prompt_ids} if prompt_ids is not None else {"prompt": args.prompt}
    plan.item = make_item(tokenizer, source, defaults, index=0, images=args.image, **chat)
    check_length(plan.item, max_len)
    on_interrupt(lambda: "generation stopped; nothing was written besides the text shown")
    return plan


def build_model(args: argparse.Namespace, plan: Plan):
    """The model (random from --config, else --checkpoint's), with the single --lora adapter, on the mesh."""
    from small4_jax.ckpt.load import from_pretrained
    from small4_jax.nn.model import init_model

    t0 = time.time()
    if args.config:
        model = init_model(plan.config, seed=args.seed, dtype=args.dtype or "float32", quantize=args.quantize)
        print(
            f"note: the weights are RANDOM ({args.config}, seed {args.seed}), so the text is gibberish"
            + (f" unless the adapters ({', '.join(args.lora)}) were trained on them. " if args.lora else ". ")
            + "For real text pass --checkpoint DIR with a Mistral Small 4 checkpoint (HF or Mistral-native).",
            file=sys.stderr,
        )
    else:
        model = from_pretrained(args.checkpoint, dtype=args.dtype or "auto", mesh=plan.mesh, quantize=args.quantize,
                                activations=args.activations, check_finite=args.check_finite, config=plan.config)
    if plan.single_lora:
        from small4_jax.lora.adapters import load_peft, shard_lora

        load_peft(model, plan.single_lora)
        shard_lora(model, plan.mesh if args.checkpoint else None)  # beside the base weights (a checkpoint is sharded)
    if plan.mesh is not None and args.config:
        from small4_jax.parallel.placement import place_model

        place_model(model, plan.mesh)
    logging.getLogger("small4_jax").info("model ready in %.1fs", time.time() - t0)
    return model


def _run_one(engine, tokenizer, item, as_json: bool) -> dict:
    """One prompt, its text streamed to stdout (with --chat, the answer; the reasoning to stderr)."""
    from infer.batch import result_row
    from infer.chat import ChatParser
    from infer.engine.engine import merge_outputs

    parser = ChatParser(tokenizer, parse_tools=False) if item.chat else None
    for t in item.prompt.forced if parser else ():
        parser.push(t)
    events = []

    def show(out):
        if parser is None:
            sys.stdout.write(out.text)
        else:
            for d in [parser.push(t) for t in out.token_ids] + ([parser.finish()] if out.finished else []):
                sys.stdout.write(d.content)
                sys.stderr.write(d.reasoning)
        sys.stdout.flush()

    def on_event(out):
        events.append(out)
        if len(events) == 1 and not out.finished:
            return  # shown with the next: the decode step compiles in between, and its log line would split the text
        for o in events[:2] if len(events) == 2 else [out]:
            show(o)

    engine.submit(item.prompt.ids, item.options, callback=on_event, images=item.prompt.images,
                  image_hashes=item.prompt.image_hashes, adapter=item.adapter)
    while not (events and events[-1].finished):
        engine.step()
    if tokenizer is not None:
        sys.stdout.write("\n")
    row = result_row(tokenizer, item, merge_outputs(events))
    result = {"token_ids": row["token_ids"], "text": row["text"]}
    if item.chat:
        result.update(reasoning_content=row["reasoning_content"], tool_calls=row["tool_calls"])
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
    sys.stdout.flush()
    return result


def _run_batch(engine, tokenizer, writer) -> dict:
    from tqdm import tqdm

    from infer.batch import result_row

    items = writer.todo
    rows = [None] * len(items)
    try:
        with tqdm(total=len(items), desc="prompts", unit="prompt", file=sys.stderr) as bar:
            def done(i, out):
                rows[i] = result_row(tokenizer, items[i], out)
                writer.add(i, rows[i])  # written and flushed as soon as the rows before it are (a failure stops all)
                bar.update(1)

            engine.generate([it.prompt.ids for it in items], [it.options for it in items], on_finish=done,
                            images=[it.prompt.images for it in items], adapters=[it.adapter for it in items])
    finally:
        writer.close()
    return {"results": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    from small4_jax.console import setup_logging

    setup_logging()
    try:
        from small4_jax.parallel import distributed

        # In a multi-process job (launch/), every process runs the same request in lockstep; one prints.
        if distributed.initialize().multi_process:
            import jax

            if jax.process_index() != 0:
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process
        run(args)
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Small4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
