"""The released checkpoint's configs (tests/fixtures/released: the HF config.json, mistral3 + pixtral, and the native
params.json, with the released dimensions): both formats resolve to one architecture and one softmax scale, the
shipped run configs are accepted against both, and `train.finetune` starts from both layouts.

The fine-tune runs use the same files with tiny dimensions substituted (`tiny_release_dir`): the real config
parsing, architecture check and loading path, on CPU.
"""

import copy
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import yaml
from ckpt_utils import pin_hf_softmax_scale, save_native_mistral3, unstack_orbax
from transformers import Mistral3Config, Mistral3ForConditionalGeneration
from transformers.models.mistral4.modeling_mistral4 import Mistral4Attention

from small4_jax.ckpt.load import checkpoint_config
from small4_jax.config import Small4Config, load_config, read_yaml
from small4_jax.errors import ConfigError
from train import config as run_config
from train.finetune import main as finetune
from train.trainer import resolve_model

REPO = Path(__file__).resolve().parent.parent
RELEASED = Path(__file__).resolve().parent / "fixtures" / "released"
FORMATS = ("hf", "native")
PLAIN = 128**-0.5  # 0.08839

# Tiny dimensions, in our field names (= the HF text_config's) and the native params.json's.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=32,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
_NATIVE_TEXT = dict(vocab_size="vocab_size", hidden_size="dim", intermediate_size="hidden_dim",
                    num_hidden_layers="n_layers", num_attention_heads="n_heads", num_key_value_heads="n_kv_heads",
                    q_lora_rank="q_lora_rank", kv_lora_rank="kv_lora_rank", qk_nope_head_dim="qk_nope_head_dim",
                    qk_rope_head_dim="qk_rope_head_dim", v_head_dim="v_head_dim")
_NATIVE_MOE = dict(n_routed_experts="num_experts", num_experts_per_tok="num_experts_per_tok",
                   moe_intermediate_size="expert_hidden_dim")


def released(fmt: str) -> dict:
    return json.loads((RELEASED / fmt / ("config.json" if fmt == "hf" else "params.json")).read_text())


def tiny_release_json(fmt: str) -> dict:
    """The released config file of `fmt` with TINY / TINY_VISION substituted for its dimensions (nothing else)."""
    d = copy.deepcopy(released(fmt))
    if fmt == "hf":
        d["text_config"].update(TINY, head_dim=TINY["qk_nope_head_dim"] + TINY["qk_rope_head_dim"])
        d["vision_config"].update(TINY_VISION, head_dim=TINY_VISION["hidden_size"] // TINY_VISION["num_attention_heads"])
    else:
        d.update({theirs: TINY[ours] for ours, theirs in _NATIVE_TEXT.items()})
        d["head_dim"] = TINY["qk_nope_head_dim"] + TINY["qk_rope_head_dim"]
        d["moe"].update({theirs: TINY[ours] for ours, theirs in _NATIVE_MOE.items()})
        d["vision_encoder"].update(TINY_VISION)
        del d["quantization"]  # the tiny weights below are float32
    return d


@torch.no_grad()
def tiny_release_dir(fmt: str, out: Path) -> Path:
    """A checkpoint directory of `fmt` whose config file is `tiny_release_json(fmt)`: random weights from
    transformers' Mistral3ForConditionalGeneration built from that very file (for native, the same weights
    renamed), plus the bundled tiny tekken.json."""
    hf_json = tiny_release_json("hf")
    model = Mistral3ForConditionalGeneration(Mistral3Config(**hf_json)).float().eval()
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        z = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.1 * z if name.endswith("norm.weight") else (0.3 if name.endswith("mlp.gate.weight") else 0.08) * z)
    if fmt == "hf":
        model.save_pretrained(str(out))
        (out / "config.json").write_text(json.dumps(hf_json, indent=2))
    else:
        save_native_mistral3(model, out)
        (out / "params.json").write_text(json.dumps(tiny_release_json("native"), indent=2))
    shutil.copy(REPO / "small4_jax" / "assets" / "tiny_tekken.json", out / "tekken.json")
    return out


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_release")
    return {fmt: tiny_release_dir(fmt, root / fmt) for fmt in FORMATS}


# ----------------------------------------------------------------------------------------------------------------------
def test_both_formats_resolve_to_one_architecture_and_the_plain_scale():
    hf, native = load_config(RELEASED / "hf"), load_config(RELEASED / "native")
    assert hf.architecture() == native.architecture()
    assert (hf.hidden_size, hf.num_hidden_layers, hf.n_routed_experts, hf.vision.num_hidden_layers) == (4096, 36, 128, 24)
    assert (hf.scale_convention, native.scale_convention) == ("hf", "native")
    assert (hf.vision.rope_interleave, native.vision.rope_interleave) == (False, True)  # the converter's permutation
    # the default scale for Mistral 4 in either format: plain 1/sqrt(qk_head_dim) (ARCHITECTURE.md §6.1)
    assert hf.attn_softmax_scale == native.attn_softmax_scale == PLAIN
    assert round(PLAIN, 5) == 0.08839
    assert hf.rope_magnitude == native.rope_magnitude == 1.0
    np.testing.assert_array_equal(hf.rope_inv_freq(), native.rope_inv_freq())


def test_mscale2_is_exactly_what_transformers_computes_for_the_release():
    """`--softmax-scale mscale2` (0.19497) reproduces transformers' current Mistral4 scale for this config.json."""
    hf_cfg = Mistral3Config(**released("hf"))
    theirs = Mistral4Attention(hf_cfg.text_config, layer_idx=0).scaling
    for fmt in FORMATS:
        ours = load_config(RELEASED / fmt, runtime={"softmax_scale": "mscale2"})
        assert ours.attn_softmax_scale == theirs
    assert math.isclose(theirs, 0.19497, rel_tol=1e-4)


def _run_dict(model: dict, **sections) -> dict:
    return {"base": {"checkpoint": "unused"}, "model": model, "data": {"train": ["data/demo_train.jsonl"]},
            **sections}


@pytest.mark.parametrize("fmt", FORMATS)
def test_shipped_run_configs_are_accepted_against_both_formats(fmt):
    found = checkpoint_config(RELEASED / fmt)
    finetune_cfg = run_config.load(REPO / "configs" / "finetune-small4.yaml")
    preset = run_config.from_dict(_run_dict(read_yaml(REPO / "configs" / "small4-119b.yaml"),
                                            runtime={"attn_impl": "blockwise", "softmax_scale": 0.195}), "preset")
    for cfg in (finetune_cfg, preset):
        model = resolve_model(cfg, found, str(RELEASED / fmt))
        assert model.architecture() == found.architecture()
        assert model.vision == found.vision  # left out by finetune-small4.yaml: the checkpoint's
        assert model.runtime == cfg.model.runtime
    assert resolve_model(preset, found, "x").attn_softmax_scale == 0.195  # the run's runtime override


def test_a_real_mismatch_names_every_field_and_both_values():
    found = checkpoint_config(RELEASED / "native")
    model = dict(read_yaml(REPO / "configs" / "small4-119b.yaml"), hidden_size=64, n_routed_experts=8)
    model["vision"] = dict(model["vision"], num_hidden_layers=2)
    cfg = run_config.from_dict(_run_dict(model), "run.yaml")
    with pytest.raises(ConfigError) as e:
        resolve_model(cfg, found, "/ckpt")
    assert str(e.value) == (
        "run.yaml: model: differs from the checkpoint /ckpt: hidden_size = 64 in the run, 4096 in the checkpoint; "
        "n_routed_experts = 8 in the run, 128 in the checkpoint; vision.num_hidden_layers = 2 in the run, 24 in the "
        "checkpoint")
    # `vision: null` trains the text model alone
    text_only = run_config.from_dict(_run_dict(dict(read_yaml(REPO / "configs" / "small4-119b.yaml"), vision=None)))
    assert resolve_model(text_only, found, "/ckpt").vision is None


def test_runtime_choices_are_not_architecture():
    cfg = Small4Config.from_dict({"attn_impl": "blockwise", "moe_impl": "dense", "softmax_scale": 0.2})
    assert cfg.runtime.attn_impl == "blockwise" and cfg.attn_impl == "blockwise"  # old flat spelling still reads
    assert cfg.architecture() == Small4Config().architecture() and "attn_impl" not in cfg.to_dict()
    assert cfg.replace(dense_impl="gmm").runtime.dense_impl == "gmm"
    with pytest.raises(ConfigError, match=r"x: runtime: softmax_scale: -1.0; expected a positive number, plain or mscale2"):
        Small4Config.from_dict({"runtime": {"softmax_scale": -1.0}}, source="x")


@pytest.mark.parametrize("fmt", FORMATS)
def test_finetune_small4_starts_on_the_released_layout(fmt, tiny_dirs, tmp_path):
    """`python -m train.finetune --config <finetune-small4 with tiny dims> --checkpoint <dir>` runs steps."""
    ckpt = tiny_dirs[fmt]
    run = read_yaml(REPO / "configs" / "finetune-small4.yaml")
    run["model"].update(TINY)
    run["data"] = {"train": [str(REPO / "data" / "demo_train.jsonl")], "eval": [], "seq_len": 256, "seed": 0}
    run["train"].update(out_dir=str(tmp_path / "run"), steps=2, batch_size=2, grad_accum=1, loss_chunk=128,
                        mesh=None, eval_every=0, ckpt_every=2, keep=1, expected_tokens_per_s=None)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert finetune(["--config", str(tmp_path / "run.yaml"), "--checkpoint", str(ckpt)]) == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert "vision" not in saved["model"]  # left out of the run: the checkpoint's again on reload
    if fmt == "hf":
        _run_saved_before_the_stacking_migrates(tmp_path / "run", tmp_path)


def _run_saved_before_the_stacking_migrates(run: Path, tmp_path: Path):
    """The run's checkpoint rewritten per layer (as a run trained before the layer stacking saved it) is refused
    with the command that migrates it, and that command gives back the stacked checkpoint, array for array."""
    import orbax.checkpoint as ocp

    from small4_jax.nn.model import layer_groups
    from small4_jax.tools.convert import main as convert_main
    from train.trainer import TrainingError, check_stacked

    items = [d for d in (run / "checkpoints").glob("*/*") if (d / "_METADATA").is_file()]
    assert items
    old = tmp_path / "old_run"
    shutil.copytree(run, old, ignore=lambda d, names: [n for n in names if Path(d, n) in items])
    groups = layer_groups(load_config(RELEASED / "hf").replace(**TINY))
    for item in items:
        unstack_orbax(item, old / item.relative_to(run), groups)
    with pytest.raises(TrainingError, match=r"saved before the layers were stacked .*`python -m small4_jax.convert "
                                            r"--migrate --from .*old_run --to .*old_run-stacked`"):
        check_stacked(old)
    assert convert_main(["--migrate", "--from", str(old), "--to", str(tmp_path / "migrated"), "--quiet"]) == 0
    check_stacked(tmp_path / "migrated")
    for item in items:
        want = ocp.PyTreeCheckpointer().restore(item)
        got = ocp.PyTreeCheckpointer().restore(tmp_path / "migrated" / item.relative_to(run))
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tiny_release_weights_match_transformers_with_both_scales(tiny_dirs):
    """The tiny HF release directory: logits equal transformers' with the scale set on both sides (plain by
    default; "mscale2" against transformers' own computation)."""
    import small4_jax

    out = tiny_dirs["hf"]
    hf = Mistral3ForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()  # file says bf16
    ids = np.random.RandomState(0).randint(14, TINY["vocab_size"], size=(1, 24)).astype(np.int32)
    theirs_mscale2 = hf.model.language_model.layers[0].self_attn.scaling
    plain = (TINY["qk_nope_head_dim"] + TINY["qk_rope_head_dim"]) ** -0.5
    for runtime, scale in ((None, plain), ({"softmax_scale": "mscale2"}, theirs_mscale2)):
        ours = small4_jax.from_pretrained(out, dtype="float32", runtime=runtime)
        assert ours.config.attn_softmax_scale == scale
        pin_hf_softmax_scale(hf, scale)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
        got = np.asarray(ours(ids))
        assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 1e-4


def test_scale_check_prints_both_scales_side_by_side(tiny_dirs, capsys):
    """benchmarks/scale_check.py on the tiny native directory, its first layer only (a reader that hides the
    others): one row per scale with its NLL over the scored tokens."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale_check", REPO / "benchmarks" / "scale_check.py")
    scale_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale_check)
    assert scale_check.scales_of("0.3, mscale2") == ["plain", "mscale2", 0.3]
    assert scale_check.main(["--checkpoint", str(tiny_dirs["native"]), "--data", str(REPO / "data" / "demo_eval.jsonl"),
                             "--layers", "1", "--dtype", "float32", "--seq-len", "256"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [r[0].strip() for r in rows] == ["plain", "mscale2"]
    values = [float(r[1]) for r in rows]
    assert values[0] == pytest.approx(16**-0.5) and values[1] > values[0]
    nlls = [float(r[2]) for r in rows]
    assert all(0 < v < 20 for v in nlls) and nlls[0] != nlls[1]
