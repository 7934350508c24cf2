"""Image input: logits and greedy generations against transformers' Mistral3ForConditionalGeneration (float32).

One tiny random Mistral3 (a mistral4 text model + a pixtral vision tower, silu, patch 4, merge 2) is written with
`save_pretrained` and read back by `small4_jax.from_pretrained`; the same weights are also written as a
Mistral-native checkpoint (q/k rows of the encoder permuted back to the interleaved RoPE layout, native names) and
converted to a sharded checkpoint. Prompts hold images of several sizes and aspect ratios, one and two per prompt,
in two turns, with text around them.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from ckpt_utils import pin_hf_softmax_scale, save_native_mistral3, tiny_hf_config
from dense_reference import dense_generate
from flax import nnx
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

import small4_jax
from small4_jax.nn import vision
from small4_jax.errors import InputError
from small4_jax.decode.generation import generate
from small4_jax.decode.sampling import SamplingParams

IMG, BREAK, END = 10, 12, 13
PATCH, MERGE = 4, 2


SEQ = 64  # prompts are padded with text to one length, so every case shares one compiled forward


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, ids, embeds):
    return nnx.merge(graphdef, state)(ids, input_embeds=embeds)


def _logits(model, ids, images):
    return _forward(*nnx.split(model), jnp.asarray(ids), vision.input_embeddings(model, ids, images))


def _rel(ours, ref):
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


@torch.no_grad()
def tiny_mistral3(seed=0, patch=PATCH, image_size=64, **text_overrides):
    """A random float32 Mistral3ForConditionalGeneration: ckpt_utils' tiny mistral4 text model + a 2-layer pixtral."""
    text = tiny_hf_config(**{"max_position_embeddings": 512, **text_overrides})
    vc = PixtralVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                             patch_size=patch, image_size=image_size, hidden_act="silu",
                             rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    cfg = Mistral3Config(text_config=text.to_dict(), vision_config=vc.to_dict(), image_token_id=IMG,
                         spatial_merge_size=MERGE, projector_hidden_act="gelu", multimodal_projector_bias=False,
                         vision_feature_layer=-1, tie_word_embeddings=False)
    model = Mistral3ForConditionalGeneration(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        z = torch.randn(p.shape, generator=gen)
        if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
            p.copy_(1.0 + 0.1 * z)
        elif name.endswith("mlp.gate.weight"):
            p.copy_(0.3 * z)
        elif name.endswith("embed_tokens.weight"):
            p.copy_(0.5 * z)
        else:
            p.copy_(0.08 * z)
    return pin_hf_softmax_scale(model)


def _to_native(hf, out_dir):
    save_native_mistral3(hf, out_dir, image_break_token_id=BREAK, image_end_token_id=END)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = tiny_mistral3()
    root = tmp_path_factory.mktemp("mistral3")
    hf.save_pretrained(str(root / "hf"))
    _to_native(hf, root / "native")
    return hf, root


@pytest.fixture(scope="module")
def ours(models):
    return small4_jax.from_pretrained(models[1] / "hf", dtype="float32")


def _image_tokens(h, w):
    gh, gw = h // (PATCH * MERGE), w // (PATCH * MERGE)
    t = ([IMG] * gw + [BREAK]) * gh
    t[-1] = END
    return t


def _prompt(sizes, seed, length=None):
    """[BOS][INST] img1 text [/INST] text [INST] img2 text [/INST] ...: images in turns, with text between (and
    after, up to `length`)."""
    rng = np.random.RandomState(seed)
    ids = [1]
    for h, w in sizes:
        ids += [3] + _image_tokens(h, w) + list(rng.randint(20, 128, 3)) + [4] + list(rng.randint(20, 128, 2))
    if length is not None:
        ids += list(rng.randint(20, 128, length - len(ids)))
    images = [rng.randn(3, h, w).astype(np.float32) for h, w in sizes]
    return np.asarray([ids], np.int32), images


def _hf_inputs(ids, images):
    sizes = [im.shape[1:] for im in images]
    hm, wm = max(s[0] for s in sizes), max(s[1] for s in sizes)
    pv = np.zeros((len(images), 3, hm, wm), np.float32)
    for i, im in enumerate(images):
        pv[i, :, : im.shape[1], : im.shape[2]] = im
    return dict(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pv),
                image_sizes=torch.tensor(np.asarray(sizes)))


CASES = {
    "one_square": [(16, 16)],  # (a single merged token trips transformers: it squeezes the features)
    "one_wide": [(16, 40)],
    "one_tall": [(32, 8)],
    "two_images_two_turns": [(24, 16), (8, 32)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(models, ours, case):
    hf, _ = models
    assert ours.config.vision.rope_interleave is False
    ids, images = _prompt(CASES[case], seed=len(case), length=SEQ)
    with torch.no_grad():
        ref = hf(**_hf_inputs(ids, images)).logits.numpy()
    assert _rel(_logits(ours, ids, images), ref) < 1e-4
    # the image matters: other pixels give other logits
    assert _rel(_logits(ours, ids, [im[:, ::-1].copy() for im in images]), ref) > 1e-3


def test_native_and_sharded_checkpoints_match(models, tmp_path):
    """Native names and the interleaved q/k layout, and a convert()ed copy of each, give the HF logits."""
    from small4_jax.tools.convert import convert

    hf, root = models
    ids, images = _prompt([(16, 24), (8, 8)], seed=3, length=SEQ)
    with torch.no_grad():
        ref = hf(**_hf_inputs(ids, images)).logits.numpy()
    native = small4_jax.from_pretrained(root / "native", dtype="float32")
    assert native.config.vision.rope_interleave is True and native.config.vision.projector_norm_eps == 1e-5
    # the projector norm's eps differs (1e-5 vs 1e-6): negligible, as documented
    assert _rel(_logits(native, ids, images), ref) < 1e-4
    sharded = small4_jax.from_pretrained(convert(root / "hf", tmp_path / "sharded", dtype="f32", progress=None),
                                         dtype="float32")
    assert _rel(_logits(sharded, ids, images), ref) < 1e-4


def test_greedy_generation_matches_transformers(models, ours):
    hf, _ = models
    ids, images = _prompt([(16, 16), (8, 24)], seed=7)
    with torch.no_grad():
        ref = hf.generate(**_hf_inputs(ids, images), max_new_tokens=8, do_sample=False, pad_token_id=11)
    want = ref[0, ids.shape[1]:].tolist()
    got = generate(ours, ids[0].tolist(), max_new_tokens=8, sampling=SamplingParams(temperature=0.0), images=images)
    assert got == want


def test_encoder_split_over_8_devices_equals_one_device(models, ours):
    """The encoder's heads and MLP width are split over every mesh axis (`sharding.RULES["vision_heads"]`), the
    patches' rows between blocks too: on 8 CPU devices the image features equal one device's, and each device
    holds 1/8 of every block projection."""
    from small4_jax.parallel.placement import place_model
    from small4_jax.parallel.sharding import make_mesh

    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    placed = place_model(small4_jax.from_pretrained(models[1] / "hf", dtype="float32"), mesh)
    attn = placed.vision_tower.transformer.layers[0].attention
    for w in (attn.q_proj.kernel, attn.o_proj.kernel, placed.vision_tower.transformer.layers[0].feed_forward.down_proj.kernel):
        assert w[...].addressable_shards[0].data.size * 8 == w[...].size, w[...].sharding
    _, images = _prompt([(16, 24), (8, 8)], seed=3)
    packed = vision.pack_images(ours.config.vision, images)
    want = np.asarray(vision.encode_images(ours, packed))
    with jax.set_mesh(mesh):
        got = vision.encode_images(placed, packed)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_image_token_count_must_match(ours):
    ids, images = _prompt([(8, 16)], seed=1)
    with pytest.raises(InputError, match=r"the prompt has 2 \[IMG\] tokens but its images give 8 \(8\)"):
        vision.input_embeddings(ours, ids, [np.zeros((3, 16, 32), np.float32)])
    with pytest.raises(InputError, match=r"image array is 12x16 pixels; expected a positive multiple of 8"):
        vision.input_embeddings(ours, ids, [np.zeros((3, 12, 16), np.float32)])


def test_packing_layout():
    """Patches row-major in (c, kh, kw) order, (row, col) positions, segments, and the channel-major 2x2 merge."""
    cfg = small4_jax.config.VisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1, patch_size=2, image_size=16)
    a = np.arange(3 * 4 * 8, dtype=np.float32).reshape(3, 4, 8)  # 2 x 4 patches -> 1 x 2 merged tokens
    b = -np.ones((3, 4, 4), np.float32)  # 2 x 2 patches -> 1 merged token
    p = vision.pack_images(cfg, [a, b])
    assert p.patches.shape == (16, 12) and p.tokens == [2, 1]
    np.testing.assert_array_equal(p.patches[5], a[:, 2:4, 2:4].reshape(-1))  # row 1, column 1
    np.testing.assert_array_equal(p.rows[:12], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(p.cols[:12], [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0, 1])
    np.testing.assert_array_equal(p.segment_ids, [0] * 8 + [1] * 4 + [vision.PAD_SEGMENT] * 4)
    np.testing.assert_array_equal(p.merge_index[:3], [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 10, 11]])


def test_block_diagonal_attention_blockwise_equals_reference():
    """The encoder's attention on three packed images plus padding, over several 512-blocks: blockwise = reference,
    and each image only sees itself (changing one image's keys leaves the others' outputs unchanged)."""
    rng = np.random.RandomState(0)
    n, h, d = 1300, 2, 16
    q, k, v = (jnp.asarray(rng.randn(n, h, d).astype(np.float32)) for _ in range(3))
    segs = jnp.asarray(np.repeat([0, 1, 2, vision.PAD_SEGMENT], [600, 450, 150, 100]).astype(np.int32))
    ref = vision.block_diagonal_attention(q, k, v, segs, d**-0.5, "reference")
    out = vision.block_diagonal_attention(q, k, v, segs, d**-0.5, "blockwise")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    k2 = k.at[600:1050].set(0.0)
    out2 = vision.block_diagonal_attention(q, k2, v, segs, d**-0.5, "blockwise")
    np.testing.assert_array_equal(out2[:600], out[:600])
    assert not np.allclose(out2[600:1050], out[600:1050])


def test_vision_weights_are_never_quantised():
    from small4_jax.config import load_config
    from small4_jax.nn import qlinear as quant
    from small4_jax.nn.model import init_model
    from small4_jax.inputs.tokenizer import ASSETS_DIR

    config = load_config(ASSETS_DIR.parent.parent / "configs" / "tiny.yaml")
    model = quant.quantize_model(init_model(config), "int8")
    assert type(model.layers[0].self_attn.o_proj) is quant.QLinear
    tower, projector = model.vision_tower, model.multi_modal_projector
    assert type(tower.transformer.layers[0].attention.q_proj) is nnx.Linear
    assert type(tower.transformer.layers[0].feed_forward.down_proj) is nnx.Linear
    assert type(projector.linear_1) is nnx.Linear and type(projector.patch_merger.merging_layer) is nnx.Linear


def test_engine_with_images_matches_transformers(models, ours):
    """The serving engine: images across prefill chunks, two image requests in one prefill batch, a text-only one
    beside them, and the prefix cache keyed by image content (same ids, other pixels: no sharing)."""
    from infer.engine.engine import Engine, SamplingOptions
    from small4_jax.inputs.images import image_hash

    hf, _ = models
    prompts = [_prompt([(16, 16), (8, 24)], seed=7), _prompt([(24, 8)], seed=8)]
    want = []
    for ids, images in prompts:
        with torch.no_grad():
            ref = hf.generate(**_hf_inputs(ids, images), max_new_tokens=6, do_sample=False, pad_token_id=11)
        want.append(ref[0, ids.shape[1]:].tolist())
    engine = Engine(ours, max_batch=4, page_size=8, prefill_chunk=8, prefill_batch=4, batch_buckets=(4,))
    engine.warmup()  # with a vision encoder: also every prefill shape that takes image features
    assert [s for s in engine.warmup_shapes() if s[0] == "image prefill"] == [
        ("image prefill", rows, 8, engine.page_buckets[0]) for rows in (1, 2, 4)]

    def compiled():  # the engine's whole-model step programs (its jitted flat-state steps, `Engine._forward`)
        return sum(step._cache_size() for _, _, step in engine._flat_steps.values())

    before = compiled()
    assert before == 7  # prefill x 3, decode x 1, image prefill x 3
    text = [1, 3, 40, 41, 42, 4]
    opts = SamplingOptions(max_tokens=6)
    out = engine.generate([ids[0].tolist() for ids, _ in prompts] + [text], opts,
                          images=[images for _, images in prompts] + [[]])
    assert compiled() == before  # the image chunks compiled no model step
    assert [o.token_ids for o in out[:2]] == want
    assert out[2].token_ids == dense_generate(ours, text, max_new_tokens=6, sampling=SamplingParams(temperature=0.0))
    ids, images = prompts[0]
    again = engine.generate([ids[0].tolist()], opts, images=[images])[0]
    assert again.token_ids == want[0] and again.cached_tokens >= 8
    other = [im[:, ::-1].copy() for im in images]
    assert image_hash(other[0]) != image_hash(images[0])
    flipped = engine.generate([ids[0].tolist()], opts, images=[other])[0]
    assert flipped.cached_tokens == 0
    with pytest.raises(InputError, match=r"the prompt has 7 \[IMG\] tokens but its images give 4 \(4\)"):
        engine.submit(ids[0].tolist(), opts, images=images[:1])


@pytest.mark.gpu_compile
def test_encoder_compiles_for_h200_at_real_dims():
    """The encoder + projector at Small 4's dims (one encoder block: each is the same program) on a 1540 x 1540 image
    (12,100 patches): compiles for sm_90a with the flash-attention kernel, and its temporaries stay far below one
    [heads, N, N] float32 score tensor (9.7 GB)."""
    from small4_jax.tools import aot
    from small4_jax.tools import aot_programs as ap
    from small4_jax.config import load_config
    from small4_jax.inputs.tokenizer import ASSETS_DIR

    config = load_config(ASSETS_DIR.parent.parent / "configs" / "small4-119b.yaml")
    config = config.replace(num_hidden_layers=1, vision=dataclasses.replace(config.vision, num_hidden_layers=1))
    mesh = aot.gpu_mesh("h200", {"data": 1, "expert": 8, "tensor": 1})
    program = ap.vision_encode(config, mesh, ((1540, 1540),))
    patches = program.args[2]
    assert patches.shape == (12288, 3 * 14 * 14)
    c = program.compile()
    assert c.uses_triton  # the Pallas flash attention (kernels/attention), segment ids = image index
    scores = 16 * 12288 * 12288 * 4
    assert c.memory.temp < scores / 16
    assert c.memory.output == 3072 * 4096 * 2  # 3,025 merged tokens (padded to 3,072) x text hidden, bf16
    # per device: the block's projections and the projector's MLP at 1/8 (heads and widths over all 8 devices), the
    # patch convolution at 1/8 (rows), the 2x2 merge whole (the flash kernel's FLOPs are not counted: aot.hlo_cost)
    n, m, d, f, text = 12288, 3072, 1024, 4096, 4096
    split = 2 * n * (4 * d * d + 3 * d * f) + 2 * m * (d * text + text * text) + 2 * n * (3 * 14 * 14) * d
    whole = 2 * m * (4 * d) * d
    assert c.cost.flops == pytest.approx(split / 8 + whole, rel=0.01)


def test_merged_export_loads_in_transformers_mistral3(models, ours, tmp_path):
    """train.export's merged checkpoint of a model with a vision block is a Mistral3 directory transformers loads
    (text under model.language_model., the encoder and projector beside it) with the same image logits."""
    from transformers import Mistral3ForConditionalGeneration as HFMistral3

    from train.export import save_merged

    hf, _ = models
    out = save_merged(ours, tmp_path / "merged")
    ids, images = _prompt([(16, 24)], seed=11, length=SEQ)
    with torch.no_grad():
        ref = hf(**_hf_inputs(ids, images)).logits.numpy()
        again = pin_hf_softmax_scale(HFMistral3.from_pretrained(str(out)).float().eval())
        again = again(**_hf_inputs(ids, images)).logits.numpy()
    assert _rel(again, ref) < 1e-5
    back = small4_jax.from_pretrained(out, dtype="float32")
    assert back.config.vision == ours.config.vision
    assert _rel(_logits(back, ids, images), ref) < 1e-4


def test_vision_feature_layer_counts_as_transformers(tmp_path):
    """vision_feature_layer = -2 projects the second-to-last block's output (hidden_states[0] is ln_pre's)."""
    hf = tiny_mistral3(seed=4)
    hf.config.vision_feature_layer = -2
    hf.save_pretrained(str(tmp_path))
    ours = small4_jax.from_pretrained(tmp_path, dtype="float32")
    assert ours.config.vision.vision_feature_layer == -2
    ids, images = _prompt([(16, 24)], seed=12, length=SEQ)
    with torch.no_grad():
        ref = hf(**_hf_inputs(ids, images)).logits.numpy()
    assert _rel(_logits(ours, ids, images), ref) < 1e-4
