"""Runtime options: how a model runs, as opposed to what its weights are (`small4_jax.config.Small4Config`).

One frozen object holds every implementation choice that does not change which function the weights compute (up
to float rounding) or that a user picks per run: the routed experts' grouped matmul, the expert-parallel strategy and
its threshold, the attention kernel, the dense projections' path, layer scanning and rematerialisation, and an
override of the attention softmax scale. Every CLI (`add_runtime_args` / `from_args`) and the run config's `runtime:`
section set it; a config carries it as `config.runtime` (`Small4Config.with_runtime`), and the architecture check
between a run and a checkpoint ignores it (`Small4Config.architecture`).

To add a field: give it a default here, a check in `validate`, and (if users set it from the command line) a flag in
`add_runtime_args`; `from_dict`, `from_args` and the run config pick it up by name.

`softmax_scale` is a number, or a name: "plain" (1/sqrt(qk_head_dim)) or "mscale2" (1/sqrt(qk_head_dim) times
YaRN's mscale(factor, mscale_all_dim)^2, exactly what transformers' Mistral4 computes since PR #47435: 0.19497 for
Mistral Small 4). None keeps the config's own scale (`Small4Config.attn_softmax_scale`).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from small4_jax.errors import ConfigError

MOE_IMPLS = ("auto", "pallas", "ragged_dot", "dense")  # "auto": the fastest correct one here (moe.resolve_impl)
ATTN_IMPLS = ("auto", "blockwise", "pallas", "reference")  # small4_jax.kernels.attention (api.py)
DENSE_IMPLS = ("xla", "gmm", "auto")  # the layers' dense projections in inference programs (moe.resolve_dense_impl)
MOE_STRATEGIES = ("auto", "replicated", "all_to_all", "none")  # must equal moe.STRATEGIES
SCALE_NAMES = ("plain", "mscale2")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Implementation choices of one run (defaults: what every CLI uses when given no flag)."""

    # Grouped matmul of the routed experts: "auto", "pallas", "ragged_dot", "dense" (moe.py).
    moe_impl: str = "auto"
    # Expert parallelism when the expert weights sit on a mesh with an 'expert' axis (moe.py): "auto" (by token
    # count), "replicated" (tokens replicated, local experts, psum), "all_to_all" (dispatch/combine), "none".
    moe_strategy: str = "auto"
    moe_a2a_min_tokens: int = 512  # "auto" uses all_to_all from this many tokens per data shard (untuned)
    # Softmax attention: "auto", "blockwise", "pallas", "reference" (kernels/attention/api.py); also the vision
    # encoder's block-diagonal attention.
    attn_impl: str = "auto"
    # The layers' dense projections (attention, shared expert) in inference programs: "xla" (XLA slices each layer's
    # weights out of the stacks: a copy per layer on GPUs), "gmm" (the grouped-matmul kernel reads the stacks in
    # place, model.run_layers), "auto" (gmm where the experts' kernel is picked, i.e. on GPUs). "xla" by default
    # until a GPU has measured gmm's speed at decode shapes (benchmarks/RESULTS.md, scan_copies).
    dense_impl: str = "xla"
    scan_layers: bool = True  # False: the same layers in a Python loop (compile-time comparison only)
    remat: bool = False  # recompute each layer's activations in the backward pass (training memory)
    # Override of the attention softmax scale: a positive number, "plain" or "mscale2" (module docstring); None
    # keeps the config's.
    softmax_scale: float | str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self, source: str = "runtime") -> None:
        def bad(field: str, expected: str):
            raise ConfigError(f"{source}: field '{field}' = {getattr(self, field)!r}; expected {expected}")

        for field, allowed in (("moe_impl", MOE_IMPLS), ("attn_impl", ATTN_IMPLS), ("dense_impl", DENSE_IMPLS),
                               ("moe_strategy", MOE_STRATEGIES)):
            if getattr(self, field) not in allowed:
                bad(field, f"one of {', '.join(allowed)}")
        if not isinstance(self.moe_a2a_min_tokens, int) or isinstance(self.moe_a2a_min_tokens, bool) \
                or self.moe_a2a_min_tokens < 0:
            bad("moe_a2a_min_tokens", "a non-negative integer")
        for field in ("scan_layers", "remat"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "true or false")
        s = self.softmax_scale
        if s is not None and not (s in SCALE_NAMES or (isinstance(s, (int, float)) and not isinstance(s, bool)
                                                       and s > 0)):
            bad("softmax_scale", f"a positive number, {' or '.join(repr(n) for n in SCALE_NAMES)}, or null")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str = "runtime", base: Runtime | None = None) -> Runtime:
        """`base` (default: the defaults) with the fields of `d` replaced; unknown keys are an error naming them."""
        if d is None:
            return base or cls()
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of runtime options ({', '.join(cls.field_names())})")
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"{source}: unknown runtime option(s) {', '.join(unknown)}; known: "
                              f"{', '.join(cls.field_names())}")
        d = {k: parse_softmax_scale(v, f"{source}: softmax_scale") if k == "softmax_scale" else v
             for k, v in d.items()}
        try:
            return dataclasses.replace(base or cls(), **d)
        except ConfigError as e:
            raise ConfigError(str(e).replace("runtime:", f"{source}:", 1)) from None

    def replace(self, **changes) -> Runtime:
        return Runtime.from_dict(changes, base=self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def changed(self) -> dict[str, Any]:
        """The fields that differ from the defaults."""
        default = Runtime()
        return {k: v for k, v in self.to_dict().items() if getattr(default, k) != v}


def parse_softmax_scale(value, where: str = "--softmax-scale") -> float | str | None:
    """A positive float, "plain", "mscale2", or None; a string holding a number becomes the number."""
    if value is None or value in SCALE_NAMES:
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a number, {' or '.join(SCALE_NAMES)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{where}: {value!r}; expected a positive number, {' or '.join(SCALE_NAMES)}")
    return float(value)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The runtime flags every CLI takes (defaults None: the run config's or `Runtime()`'s value stays)."""
    g = p.add_argument_group("runtime (small4_jax.runtime.Runtime)")
    g.add_argument("--moe-impl", choices=MOE_IMPLS, default=None, help="routed experts' grouped matmul (default auto)")
    g.add_argument("--moe-strategy", choices=MOE_STRATEGIES, default=None,
                   help="expert parallelism on a mesh with an 'expert' axis (default auto)")
    g.add_argument("--attn-impl", choices=ATTN_IMPLS, default=None, help="attention kernel (default auto)")
    g.add_argument("--dense-impl", choices=DENSE_IMPLS, default=None,
                   help="the layers' dense projections in inference programs (default xla)")
    g.add_argument("--softmax-scale", default=None, metavar="SCALE",
                   help="attention softmax scale: a number, 'plain' (1/sqrt(qk_head_dim), the default for Mistral "
                   "Small 4 in either format) or 'mscale2' (times YaRN mscale^2: transformers' Mistral4 since "
                   "#47435, 0.19497 for Small 4); default: the config's")


def from_args(args: argparse.Namespace, base: Runtime | None = None) -> Runtime:
    """`base` with what the runtime flags of `add_runtime_args` set (flags left out keep `base`'s value)."""
    changes = {}
    for field in ("moe_impl", "moe_strategy", "attn_impl", "dense_impl"):
        if getattr(args, field, None) is not None:
            changes[field] = getattr(args, field)
    if getattr(args, "softmax_scale", None) is not None:
        changes["softmax_scale"] = parse_softmax_scale(args.softmax_scale)
    return Runtime.from_dict(changes, source="command line", base=base)
