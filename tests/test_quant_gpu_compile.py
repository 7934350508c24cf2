"""Quantised programs compile for H100 / H200 (sm_90a) at Small 4's dims (deviceless, `small4_jax/tools/aot.py`).

    kernel   the in-kernel dequantising grouped matmul (`kernels/gmm/quant_triton.py`): fp8 at decode with the input
             gradient (QLoRA's backward), int4 g128 at prefill with the input gradient, int8 at one row
    model    the engine's decode step of the fp8 model on ONE H200 (one layer: every layer is the same program):
             the expert weights enter as fp8 bytes + scales, and no float copy of a weight is made (temporaries
             stay below one bf16 copy of the smallest quantised projection)
    gptq     the calibration pipeline's GPU programs: per-expert Hessians (Pallas tgmm, float32) and a GPTQ batch
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from small4_jax.tools import aot
from small4_jax.tools import aot_programs as ap
from small4_jax.quant import formats as quant
from small4_jax.config import Small4Config

E, H, F = 128, 4096, 2048
CASES = [  # (target, fmt, rows, k, n, grad)
    ("h200", "fp8", 64, H, 2 * F, True),  # gate_up at decode (split-K tiling), forward + dx
    ("h100", "int4", 4096, F, H, True),  # down at prefill, forward + dx
    ("h100", "int8", 1, H, 2 * F, False),  # one row
]


@pytest.mark.gpu_compile
@pytest.mark.parametrize("target, fmt, rows, k, n, grad", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}rows" for c in CASES])
def test_quantised_gmm_compiles(target, fmt, rows, k, n, grad):
    mesh = aot.gpu_mesh(target, {"x": 1}, topology="1x1x1")
    c = ap.gmm_quant(mesh, rows, fmt, k=k, n=n, grad=grad).compile()
    assert c.triton_calls == (2 if grad else 1)  # the forward, and dx = dy @ W^T from the same bytes
    vshape, sshape, vdtype = quant.stored_shapes((E, k, n), fmt)
    weight_bytes = (int(np.prod(vshape)) * jnp.dtype(vdtype).itemsize
                    + int(np.prod(sshape)) * quant.scale_dtype(fmt).itemsize)  # int4: bf16 scales
    assert c.memory.argument == rows * k * 2 + weight_bytes + E * 4
    assert c.memory.temp < E * k * n  # no dequantised copy of the experts (that would be 2 bytes per weight)


W8A8_CASES = [(64, H, 2 * F), (4096, F, H)]  # gate_up at decode (split-K), down at prefill


@pytest.mark.gpu_compile
@pytest.mark.parametrize("rows, k, n", W8A8_CASES, ids=[f"{c[0]}rows" for c in W8A8_CASES])
def test_w8a8_gmm_compiles(rows, k, n):
    """fp8 x fp8 (activations quantised with the experts' static scales): the kernel compiles for sm_90a with fp8
    operands; arguments are the bf16 rows, the fp8 experts and three small scale arrays, and the temporaries hold the
    rows in fp8 (the quantisation pass), never a widened weight."""
    mesh = aot.gpu_mesh("h200", {"x": 1}, topology="1x1x1")
    c = ap.gmm_quant(mesh, rows, "fp8", k=k, n=n, w8a8=True).compile()
    assert c.triton_calls == 1
    call = next(line for line in c.text.splitlines() if aot.TRITON_MARKER in line)
    assert f"tensor<{rows}x{k}xf8E4M3FN>, tensor<1x{E}x{k}x{n}xf8E4M3FN>" in call  # fp8 rows, fp8 experts in
    assert c.memory.argument == rows * k * 2 + E * k * n + E * 4 + E * 4 + E * 4
    assert c.memory.temp < E * k * n  # no widened copy of the experts


def _fp8_gemm_fusions(hlo: str) -> int:
    """XLA GPU GEMM fusions (its Triton GEMM emitter) whose operands are both float8: an fp8 x fp8 dot."""
    return len(re.findall(r"gemm_fusion_dot[.\d]*_computation \(\S+: f8e4m3fn\[[\d,]+\], \S+: f8e4m3fn\[", hlo))


@pytest.mark.gpu_compile
def test_w8a8_dense_linear_compiles_to_an_fp8_gemm():
    """A W8A8 dense linear (`quant.w8a8_dot`, o_proj's shape at 64 rows) is an fp8 x fp8 GEMM in the compiled sm_90a
    HLO: XLA's Triton GEMM fusion with both operands fp8 by default (a deviceless compile cannot autotune, so XLA
    takes its Triton emitter), and cuBLASLt's FP8 GEMM (`__cublas$lt$matmul$f8`, the scales folded into alpha) when
    the Triton GEMM is off. cuBLASLt's FP8 GEMM on Hopper takes the weight K-major, so for our [in, out] kernel XLA
    adds a transpose of the weight before it (a copy per call, in the temporaries): which of the two a GPU should
    use is for `benchmarks/quant_decode.py` on one to decide."""
    mesh = aot.gpu_mesh("h200", {"x": 1}, topology="1x1x1")

    def linear(x, values, scale, act):
        return quant.w8a8_dot(x, quant.QArray(values, scale, act), jnp.bfloat16)

    args = (aot.spec((64, H), jnp.bfloat16, mesh), aot.spec((H, H), jnp.float8_e4m3fn, mesh),
            aot.spec((1, 1), jnp.float32, mesh), aot.spec((1, 1), jnp.float32, mesh))
    triton = aot.compile_for(linear, *args, mesh=mesh)
    assert _fp8_gemm_fusions(triton.compiled.as_text()) == 1
    assert triton.memory.temp < H * H  # the weight is not widened
    cublas = aot.compile_for(linear, *args, mesh=mesh, compiler_options={"xla_gpu_enable_triton_gemm": False})
    assert cublas.compiled.as_text().count('custom_call_target="__cublas$lt$matmul$f8"') == 1


@pytest.mark.gpu_compile
@pytest.mark.parametrize("activations", [None, "fp8"], ids=["weight-only", "w8a8"])
def test_fp8_decode_step_compiles_on_one_h200(activations):
    """fp8 weights; with activations="fp8" (W8A8) the routed experts go through the fp8 x fp8 kernel and the seven
    dense linears of the layer (q_a, q_b, kv_a, o_proj; the shared expert's gate, up, down: kv_b is folded into the
    query and output by absorbed decode) are fp8 x fp8 GEMM fusions."""
    config = Small4Config.from_yaml("configs/small4-119b.yaml").replace(num_hidden_layers=1)
    mesh = aot.gpu_mesh("h200", {"data": 1, "expert": 1, "tensor": 1}, topology="1x1x1")
    program = ap.serve_step(config, mesh, absorbed=True, rows=16, tokens=1, table_pages=64, num_pages=1024,
                            quantize="fp8", activations=activations)
    c = program.compile()
    assert c.uses_triton  # the routed experts through the dequantising kernel
    assert ("small4_gmm_w8a8" in c.text) == (activations == "fp8")
    assert _fp8_gemm_fusions(c.compiled.as_text()) == (7 if activations else 0)
    state = program.args[0]
    leaves = [x for x in __import__("jax").tree.leaves(state)]
    fp8 = sum(int(np.prod(x.shape)) for x in leaves if x.dtype == jnp.float8_e4m3fn)
    assert fp8 >= E * H * 3 * F  # the experts (and projections) are fp8 arguments
    assert c.memory.temp < 2 * 4096 * 4096  # below one bf16 copy of o_proj: weights are never widened in memory


@pytest.mark.gpu_compile
def test_fp8_forward_compiles_expert_parallel_on_8_h200():
    """fp8 experts and their per-expert scales sharded together over `expert`, all-to-all dispatch (4096 tokens)."""
    config = Small4Config.from_yaml("configs/small4-119b.yaml").replace(num_hidden_layers=1)
    mesh = aot.gpu_mesh("h200", {"data": 1, "expert": 8, "tensor": 1})
    program = ap.model_forward(config, mesh, 4096, quantize="fp8")
    c = program.compile()
    assert c.uses_triton and c.uses_ragged_all_to_all
    flat = {tuple(str(p) for p in path): v for path, v in __import__("flax").nnx.to_flat_state(program.args[0])}
    experts = ("layer_stacks", "0", "mlp", "experts")  # one layer: stack 0 [1, E, ...], the layer axis unsharded
    scale, values = flat[experts + ("gate_up_scale",)], flat[experts + ("gate_up",)]
    assert scale.sharding.spec[1] == "expert" and values.sharding.spec[1] == "expert"
    # no bf16 copy of this device's experts: the temporaries are those of the bf16 model's same program
    bf16 = ap.model_forward(config, mesh, 4096).compile()
    assert c.memory.temp <= bf16.memory.temp * 1.05


@pytest.mark.gpu_compile
def test_gptq_calibration_programs_compile():
    """The layer-at-a-time GPTQ pipeline on a GPU (`calibration.py`, `quant.gptq_int4`): the per-expert Hessians of
    the routed tokens are the Pallas tgmm in float32 (Triton; no dense [tokens, experts] expansion: a few bytes of
    temporaries for [E, H, H] out), and a batch of GPTQ problems of Small 4's down_proj shape compiles with
    temporaries of a few copies of its inputs."""
    from small4_jax.kernels import tgmm

    mesh = aot.gpu_mesh("h200", {"x": 1}, topology="1x1x1")
    rows = 4 * 8192  # one calibration batch of 8192 tokens, top-4
    x, sizes = aot.spec((rows, H), jnp.float32, mesh), aot.spec((E,), jnp.int32, mesh)
    c = aot.compile_for(lambda x, g: tgmm(x, x, g, backend="pallas", interpret=False), x, sizes, mesh=mesh)
    assert c.uses_triton and c.memory.output == E * H * H * 4 and c.memory.temp < 1 << 20
    k, n = F, H
    b = quant.gptq_batch_elements("gpu") // (k * (k + n))  # what gptq_int4 batches on a GPU
    w, h = aot.spec((b, k, n), jnp.float32, mesh), aot.spec((b, k, k), jnp.float32, mesh)
    c = aot.compile_for(lambda w, h, d: quant._gptq_batch.__wrapped__(w, h, d, quant.INT4_GROUP, False), w, h,
                        aot.spec((), jnp.float32, mesh), mesh=mesh)
    packed = b * (k // 2) * n + b * (k // quant.INT4_GROUP) * n * 2  # int4 two per byte + bf16 scales
    assert packed <= c.memory.output < packed + 1024  # (+ the output tuple's few bytes)
    assert c.memory.temp < 2 * c.memory.argument  # measured 7.8 GB for 4.3 GB in (b = 85): fits an H200 beside a layer
