"""LoRA math against transformers + PEFT: same tiny Mistral4, same adapter weights -> same logits and LoRA gradients.

Reference: transformers `Mistral4ForCausalLM` (float32) with PEFT `LoraConfig(target_modules=[...attention, shared
expert and dense MLP linears...], target_parameters=[...experts.gate_up_proj, ...experts.down_proj])` loaded from the
adapter directory our `save_peft` wrote (so the PEFT layout, nesting and rank/alpha patterns are checked too).
Adapters are randomised (B != 0) so every adapter changes the output. The expert rank differs from the dense rank
(moe_rank_scaling) to exercise PEFT's rank_pattern/alpha_pattern.
"""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import small4_jax
from ckpt_utils import make_hf_model, save_hf, tiny_hf_config
from small4_jax.lora import adapters as lora
from small4_jax.errors import ConfigError
from small4_jax.nn.model import per_layer_items


B, T = 2, 24


def _randomise(model, seed):
    """Replace every LoRA parameter with N(0, 0.05^2) noise (B matrices non-zero)."""
    rng = np.random.RandomState(seed)
    flat = [(p, v.replace(jnp.asarray(0.05 * rng.randn(*v.shape), jnp.float32)))
            for p, v in nnx.to_flat_state(nnx.state(model, lora.TRAINABLE))]
    nnx.update(model, nnx.from_flat_state(flat))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_peft")
    cfg = tiny_hf_config()
    hf = make_hf_model(cfg, seed=3)
    save_hf(hf, root / "base")
    ours = small4_jax.from_pretrained(root / "base", dtype="float32")
    lcfg = lora.LoRAConfig(targets=("all",), rank=4, alpha=6.0, moe_rank_scaling=True, seed=1)
    paths = lora.apply_lora(ours, lcfg)
    _randomise(ours, 7)
    lora.save_peft(ours, root / "adapter")
    ref = peft.PeftModel.from_pretrained(make_hf_model(cfg, seed=3), str(root / "adapter"), is_trainable=True)
    ref.eval()
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
    return ours, ref, ids, paths, cfg


def test_targets_cover_every_kind(setup):
    ours, _, _, paths, cfg = setup
    assert "layers.0.mlp.gate_proj" in paths  # dense layer
    assert "layers.1.mlp.shared_experts.down_proj" in paths
    assert "layers.2.mlp.experts" in paths
    assert "layers.1.self_attn.q_a_proj" in paths and "layers.1.self_attn.kv_b_proj" in paths
    assert not any(p.endswith("mlp.gate") for p in paths)  # the router only when asked
    ex = ours.layers[1].mlp.experts.lora
    assert ex.rank == 4 // cfg.num_experts_per_tok and ex.gate_up_a.shape == (8, 64, 2)
    for v in jax.tree.leaves(nnx.state(ours, lora.TRAINABLE)):
        assert v.dtype == jnp.float32


def test_logits_match_peft(setup):
    ours, ref, ids, _, _ = setup
    with torch.no_grad():
        want = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        base = ref.get_base_model()
        with ref.disable_adapter():
            plain = base(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(ours(ids))
    assert _rel(got, want) < 1e-4
    assert _rel(plain, want) > 1e-2  # the adapters matter


def _peft_grads(ref, ids):
    ref.zero_grad()
    x = torch.tensor(ids, dtype=torch.long)
    logits = ref(x).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    return {n: p.grad.numpy().copy() for n, p in ref.named_parameters() if p.requires_grad}, float(loss)


def test_lora_gradients_match_peft(setup):
    ours, ref, ids, _, cfg = setup
    graphdef, params, rest = nnx.split(ours, lora.TRAINABLE, ...)

    def loss_fn(p):
        m = nnx.merge(graphdef, p, rest)
        logits = m(ids)[:, :-1].astype(jnp.float32)
        labels = jnp.asarray(ids[:, 1:])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, labels[..., None], -1).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    want, want_loss = _peft_grads(ref, ids)
    assert abs(float(loss) - want_loss) < 1e-5 * abs(want_loss)
    # every trainable PEFT parameter is LoRA, and every one of ours has a counterpart
    assert all(".lora_A." in n or ".lora_B." in n for n in want)
    flat = {path: np.asarray(v) for path, v in per_layer_items(ours.config, grads)}  # stacks unstacked
    e = cfg.n_routed_experts
    checked = 0
    for path, ad in lora.adapters(ours).items():
        pre = "base_model.model.model." + path
        if isinstance(ad, lora.ExpertsLoRA):
            key = tuple(path.split(".")) + ("lora",)
            for proj, wrap in (("gate_up", ".base_layer"), ("down", "")):
                ga, gb = lora._expert_from_peft(want[f"{pre}{wrap}.lora_A.default.weight"],
                                                want[f"{pre}{wrap}.lora_B.default.weight"], e)
                assert _rel(flat[key + (f"{proj}_a",)], ga) < 1e-4, (path, proj)
                assert _rel(flat[key + (f"{proj}_b",)], gb) < 1e-4, (path, proj)
                checked += 2
        else:
            key = tuple(path.split("."))
            assert _rel(flat[key + ("lora_a",)], want[f"{pre}.lora_A.default.weight"].T) < 1e-4, path
            assert _rel(flat[key + ("lora_b",)], want[f"{pre}.lora_B.default.weight"].T) < 1e-4, path
            checked += 2
    assert checked == len(flat) == len(want)


def test_grouped_matmul_adapters_equal_merged_dense_reference(setup):
    """The unmerged grouped-matmul path equals merged weights run through the dense (one-hot) expert reference."""
    ours, _, ids, _, cfg = setup
    plain = small4_jax.init_model(ours.config, dtype="float32")
    lora.merge_into(plain, ours)
    dense = nnx.clone(plain)
    dense.config = ours.config.replace(moe_impl="dense")
    for layer in dense.layer_stacks:
        if hasattr(layer.mlp, "config"):
            layer.mlp.config = dense.config
    assert _rel(dense(ids), ours(ids)) < 1e-4


def test_target_matching_nothing_is_an_error(setup):
    model = small4_jax.init_model(setup[0].config, dtype="float32")
    with pytest.raises(ConfigError, match="match no module"):
        lora.apply_lora(model, lora.LoRAConfig(targets=("o_proj", "wq")))
    paths = lora.apply_lora(model, lora.LoRAConfig(targets=(r"layers\.2\.self_attn\..*_b_proj", "router")))
    assert paths == ["layers.1.mlp.gate", "layers.2.self_attn.q_b_proj", "layers.2.self_attn.kv_b_proj",
                     "layers.2.mlp.gate"]


# every adapter shape peft itself writes: (target_modules, target_parameters, rank_pattern, alpha_pattern)
EXPERT_DOWN, EXPERT_GATE_UP = "mlp.experts.down_proj", "mlp.experts.gate_up_proj"
PEFT_SHAPES = {
    "one_expert_weight_down": ([], [EXPERT_DOWN], {}, {}),
    "one_expert_weight_gate_up": ([], [EXPERT_GATE_UP], {}, {}),
    "attention_only_patterns": (["q_a_proj", "kv_b_proj", "o_proj"], [], {"o_proj": 4}, {"kv_b_proj": 5.0}),
    "everything_nested": (["q_b_proj", "o_proj", "gate_proj", "down_proj"], [EXPERT_GATE_UP, EXPERT_DOWN],
                          {"q_b_proj": 3}, {"o_proj": 1.5}),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft_base")
    save_hf(make_hf_model(tiny_hf_config(), seed=3), path)
    return path


@pytest.mark.parametrize("shape", list(PEFT_SHAPES))
def test_every_peft_adapter_shape_loads_and_matches_peft(setup, base_dir, tmp_path, shape):
    """Adapters written by peft itself (not by our save_peft) load and give PEFT's logits; the multi-LoRA reader
    (serve's --lora / load_lora_adapter, generate's --lora) takes them too."""
    from small4_jax.lora.multi import MultiLoRA

    _, _, ids, _, cfg = setup
    modules, params, ranks, alphas = PEFT_SHAPES[shape]
    torch.manual_seed(0)
    ref = peft.get_peft_model(make_hf_model(cfg, seed=3), peft.LoraConfig(
        r=2, lora_alpha=3.0, target_modules=modules, target_parameters=params, rank_pattern=ranks,
        alpha_pattern=alphas))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(0.05 * torch.randn_like(p))
        want = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ref.save_pretrained(tmp_path)
    ours = small4_jax.from_pretrained(base_dir, dtype="float32")
    done = lora.load_peft(ours, tmp_path)
    assert _rel(np.asarray(ours(ids)), want) < 1e-4
    weights, _ = MultiLoRA(small4_jax.from_pretrained(base_dir, dtype="float32"), 2, 4).read("a", tmp_path)
    assert sorted(weights) == sorted(done)


def test_expert_adapter_of_the_wrong_shape_names_the_tensor(setup, base_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, _, _, _, cfg = setup
    ref = peft.get_peft_model(make_hf_model(cfg, seed=3), peft.LoraConfig(r=2, target_modules=[],
                                                                           target_parameters=[EXPERT_DOWN]))
    ref.save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    tensors = load_file(f)
    key = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"
    tensors[key] = np.zeros((16, 48), np.float32)  # neither the hidden (64) nor the expert width (32)
    save_file(tensors, f)
    with pytest.raises(ConfigError, match=r"layers\.1\.mlp\.experts\.lora_A\.weight has shape \[16, 48\]; expected"):
        lora.load_peft(small4_jax.from_pretrained(base_dir, dtype="float32"), tmp_path)
