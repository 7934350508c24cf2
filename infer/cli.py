"""Command-line pieces shared by `infer.serve` and `infer.generate`: engine flags and model / tokenizer loading.

Imports stay inside the functions, so `--help` does not load JAX.
"""

from __future__ import annotations

import argparse

from small4_jax.errors import InputError, Small4Error


SHARD_LATENT_PROJ_HELP = (
    "split q_a_proj and kv_a_proj over the mesh's tensor axis by their input dim: each GPU reads 1/tp of them "
    "instead of all (36 layers x 5.5 MB in fp8) for one more all-reduce per layer (three instead of two); pays only "
    "where a collective costs under ~1.4 us (README, 'Choosing a layout on 8 GPUs')")


def add_engine_args(p: argparse.ArgumentParser, max_batch: int = 16) -> None:
    """The engine's sizing flags (shared by infer.serve and infer.generate)."""
    g = p.add_argument_group("engine")
    g.add_argument("--max-batch", type=int, default=max_batch, help="requests decoded together")
    g.add_argument("--page-size", type=int, default=16, help="tokens per cache page")
    g.add_argument("--num-pages", type=int, default=None, help="cache pages (default: what fits in device memory)")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: the model's, "
                                                                    "at most 262144)")
    g.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per request per prefill step")
    g.add_argument("--prefill-batch", type=int, default=4, help="requests prefilled together in one step")
    g.add_argument("--max-queue", type=int, default=256, help="requests waiting before back-pressure")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn off prefix caching")
    g.add_argument("--cache-axes", default=None, help="mesh axes the paged cache is sharded over, comma-separated "
                   "(data-parallel attention: the cache grows with them); 'none' replicates it (default: data)")
    g.add_argument("--context-axes", default=None, help="mesh axes one sequence's cache is split over by position, "
                   "comma-separated (decode context parallelism: one long request's cache spread over the devices, "
                   "e.g. --mesh tensor=8 --context-axes tensor); not with --cache-axes")
    g.add_argument("--shard-latent-proj", action="store_true", help=SHARD_LATENT_PROJ_HELP)
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every step shape before serving, with a progress line each (default on)")
    g.add_argument("--speculative", metavar="METHOD", help="speculative decoding: 'ngram' (prompt lookup) or "
                   "'eagle:DIR' (an EAGLE draft head checkpoint); see infer/speculative/decoder.py")
    g.add_argument("--num-draft-tokens", type=int, default=4, help="draft tokens per row and step (--speculative)")
    g.add_argument("--max-loras", type=int, default=None, help="LoRA adapter slots (default: the adapters given; "
                   "more leave room for loading at run time)")
    g.add_argument("--max-lora-rank", type=int, default=None, help="largest adapter rank a slot holds (default: the "
                   "largest given)")
    g.add_argument("--lora-targets", default=None, help="modules LoRA slots are held for, comma-separated (lora "
                   "targets: all, attention, experts, module names, regexes; default: the modules the --lora adapters "
                   "have, else all)")
    g.add_argument("--quantize", metavar="FORMAT", default=None,
                   help="weights of the linears and experts in memory and compute: fp8, int8, int4 (routed experts "
                   "int4, dense linears int8), int4-all (int4 everywhere) or none (small4_jax.quant.formats.SPELLINGS; "
                   "default: an FP8 checkpoint stays fp8, others unquantised; none dequantises)")
    g.add_argument("--no-finite-check", dest="check_finite", action="store_false",
                   help="load a checkpoint without checking its float weights for NaN / inf (the check is one pass "
                   "over each tensor as it is read)")
    g.add_argument("--activations", choices=["fp8", "none"], default=None,
                   help="fp8: W8A8 on an FP8 checkpoint, each linear's and expert's input quantised to e4m3 with the "
                   "checkpoint's static activation scales and multiplied fp8 x fp8 (inference only; default none: "
                   "weight-only, activations in the compute dtype)")
    from small4_jax.runtime import add_runtime_args

    add_runtime_args(p)


def engine_kwargs(args: argparse.Namespace) -> dict:
    speculative = None
    if getattr(args, "speculative", None):
        from infer.speculative.decoder import SpeculativeConfig

        speculative = SpeculativeConfig.parse(args.speculative, args.num_draft_tokens)
    from small4_jax.lora.multi import parse_lora_flags

    loras = parse_lora_flags(getattr(args, "lora_adapters", None))
    return dict(speculative=speculative, lora_adapters=loras, max_loras=getattr(args, "max_loras", None),
                max_lora_rank=getattr(args, "max_lora_rank", None), lora_targets=_lora_targets(args), max_batch=args.max_batch, page_size=args.page_size, num_pages=args.num_pages,
                max_model_len=args.max_model_len, prefill_chunk=args.prefill_chunk, prefill_batch=args.prefill_batch,
                max_queue=args.max_queue,
                prefix_caching=not args.no_prefix_caching, cache_axes=_cache_axes(getattr(args, "cache_axes", None)),
                context_axes=_cache_axes(getattr(args, "context_axes", None)) or (),
                shard_latent_proj=getattr(args, "shard_latent_proj", False))


def parse_mesh(text: str | None):
    """--mesh: None, or the device mesh it names (`sharding.make_mesh`)."""
    if not text:
        return None
    from small4_jax.parallel.sharding import make_mesh

    return make_mesh(text, "--mesh")


def _lora_targets(args) -> tuple[str, ...] | None:
    text = getattr(args, "lora_targets", None)
    return None if text is None else tuple(t.strip() for t in text.split(",") if t.strip())


def _cache_axes(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(a.strip() for a in text.split(",") if a.strip() and a.strip() != "none")


DTYPES = ("float32", "bfloat16")
DEFAULT_TOKENIZER = "tiny_tekken.json"  # in small4_jax/assets: --config's tokenizer for generate and serve alike


def preflight(args: argparse.Namespace, need_tokenizer: bool = False):
    """(config, tokenizer, mesh): everything --config / --checkpoint / --tokenizer / --dtype / --mesh say that can be
    checked before a model is built, so a mistake costs a second, not the build's minute.

    The tokenizer is the --tokenizer given, else the checkpoint's, else (with --config) the run config's
    `base.tokenizer`, else the bundled tiny tekken.json; a checkpoint without one gives None unless `need_tokenizer`.
    """
    from small4_jax.ckpt.load import checkpoint_config
    from small4_jax.config import Small4Config, read_yaml
    from small4_jax.inputs.tokenizer import ASSETS_DIR, load_tokenizer

    if args.dtype is not None and args.dtype not in DTYPES:
        raise InputError(f"--dtype {args.dtype!r}: expected one of {', '.join(DTYPES)}")
    if getattr(args, "quantize", None) is not None:
        from small4_jax.quant.formats import check_format

        check_format(args.quantize, "--quantize")
    mesh = parse_mesh(args.mesh)
    from small4_jax import runtime

    config = Small4Config.from_yaml(args.config) if args.config else checkpoint_config(args.checkpoint)
    config = config.with_runtime(runtime.from_args(args, config.runtime))
    tokenizer = None
    if args.tokenizer:
        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except Small4Error as e:
            raise InputError(f"--tokenizer: {e}") from None
    elif args.config:
        base = read_yaml(args.config).get("base")  # a fine-tuning run config names the tokenizer it trained with
        named = base.get("tokenizer") if isinstance(base, dict) else None
        tokenizer = load_tokenizer(named or ASSETS_DIR / DEFAULT_TOKENIZER)
    else:
        try:
            tokenizer = load_tokenizer(args.checkpoint)
        except Small4Error as e:
            if need_tokenizer:
                raise InputError(f"{e}; pass --tokenizer FILE") from None
    check_engine_args(args, config)
    check_adapters_and_drafter(args)
    if getattr(args, "activations", None) == "fp8":
        if args.config:
            raise InputError("--activations fp8 (W8A8) needs an FP8 checkpoint's static activation scales: pass "
                             "--checkpoint DIR (a random --config model has none)")
        if args.quantize not in (None, "fp8"):
            raise InputError(f"--activations fp8 (W8A8) needs fp8 weights; --quantize {args.quantize}")
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise InputError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{config.vocab_size}")
    return config, tokenizer, mesh


def check_engine_args(args: argparse.Namespace, config) -> None:
    """The engine's sizes, checked before the model is built (the Engine would say the same after the build)."""
    for flag in ("max_batch", "page_size", "num_pages", "max_model_len", "prefill_chunk", "prefill_batch",
                 "max_queue", "num_draft_tokens", "max_loras", "max_lora_rank"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    limit = config.max_position_embeddings
    if args.max_model_len is not None and args.max_model_len > limit:
        raise InputError(f"--max-model-len {args.max_model_len} exceeds the model's context of {limit} tokens "
                         "(max_position_embeddings)")


def check_adapters_and_drafter(args: argparse.Namespace) -> None:
    """--lora NAME=DIR adapters (config and safetensors header) and --speculative (method, EAGLE directory), checked
    before the model is built: `engine_kwargs` and the engine would find the same problems after the build."""
    from small4_jax.lora.adapters import check_peft_dir
    from small4_jax.lora.multi import adapter_rank

    for name, directory in engine_kwargs(args)["lora_adapters"]:  # parses --speculative too
        check_peft_dir(directory, f"--lora {name}={directory}")
        adapter_rank(directory)
    spec = engine_kwargs(args)["speculative"]
    if spec is not None:
        spec.check_files()


def load_model_and_tokenizer(args: argparse.Namespace):
    """(model, tokenizer, mesh) from --config / --checkpoint, --tokenizer, --dtype, --seed, --mesh."""
    from small4_jax.ckpt.load import from_pretrained
    from small4_jax.nn.model import init_model
    from small4_jax.parallel.placement import place_model

    config, tokenizer, mesh = preflight(args)
    if args.config:
        model = init_model(config, seed=args.seed, dtype=args.dtype or "float32", quantize=args.quantize)
        if mesh is not None:
            place_model(model, mesh)
    else:
        model = from_pretrained(args.checkpoint, dtype=args.dtype or "auto", mesh=mesh, quantize=args.quantize,
                                activations=getattr(args, "activations", None), check_finite=args.check_finite,
                                config=config)
    return model, tokenizer, mesh
