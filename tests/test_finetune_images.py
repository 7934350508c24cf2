"""Fine-tuning rows with image chunks (mistral-finetune's format): tokens and pixels from mistral-common, the loss
equal to transformers' Mistral3 on the same row, and a LoRA run on the tiny preset with its vision block frozen."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image
from test_vision import tiny_mistral3

import small4_jax
from small4_jax.inputs.tokenizer import ASSETS_DIR, load_tokenizer
from train import config as run_config
from train.data import DataError, load_dataset
from train.trainer import token_loss, with_images

ROOT = Path(__file__).resolve().parent.parent
TEKKEN = ASSETS_DIR / "tiny_tekken.json"


def _url(size, seed):
    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _row(i, size):
    return {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": _url(size, i)},
                                     {"type": "text", "text": f"what is in picture {i}?"}]},
        {"role": "assistant", "content": f"a cat number {i}"}]}


def test_image_row_loss_equals_transformers(tmp_path):
    tok = load_tokenizer(TEKKEN)
    row = _row(0, (70, 40))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(row) + "\n")
    packed, stats = load_dataset([data], tok, seq_len=96, seed=0)
    assert stats.rows == 1 and len(packed.images) == 1 and len(packed.images[0]) == 1
    ref = tok.mistral_tokenizer().encode_chat_completion(
        ChatCompletionRequest.from_openai(row["messages"][:1]))  # the prompt part, same image
    np.testing.assert_array_equal(packed.images[0][0], ref.images[0])
    n = int(packed.segments[0].astype(bool).sum())
    assert packed.inputs[0, : len(ref.tokens)].tolist() == ref.tokens

    hf = tiny_mistral3(seed=2, patch=14, image_size=1540, vocab_size=512, max_position_embeddings=256)
    hf.save_pretrained(str(tmp_path / "ckpt"))
    ours = small4_jax.from_pretrained(tmp_path / "ckpt", dtype="float32")
    idx = np.array([0])
    batch = with_images(packed.take(idx), packed, idx, ours)
    total, count = token_loss(ours, batch)
    image = torch.tensor(ref.images[0])[None]
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(packed.inputs[:, :n], dtype=torch.long), pixel_values=image,
                    image_sizes=torch.tensor([list(image.shape[2:])])).logits[0].double()
    ce = torch.logsumexp(logits, -1) - logits.gather(-1, torch.tensor(packed.targets[0, :n])[:, None].long())[:, 0]
    w = torch.tensor(packed.weights[0, :n]).double()
    assert float(count) == float(w.sum()) > 0
    assert abs(float(total) - float((ce * w).sum())) / float((ce * w).sum()) < 1e-4


def test_bad_image_rows_name_the_line(tmp_path):
    tok = load_tokenizer(TEKKEN)
    bad = _row(1, (40, 40))
    bad["messages"][0]["content"][0]["image_url"] = "https://example.com/cat.png"
    good = _row(2, (40, 40))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: cannot be tokenised: messages\[0\]\.content\[0\]: image "
                                        r"URLs are not fetched"):
        load_dataset([data], tok, seq_len=96, seed=0)
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps(_row(3, (600, 600))) + "\n")
    with pytest.raises(DataError, match=r"big.jsonl:1: 550 tokens with images: cut to data.seq_len = 64 it would "
                                        r"split an image"):
        load_dataset([big], tok, seq_len=64, seed=0)


def test_projector_adapters_only_on_request():
    from small4_jax.lora import adapters as lora
    from small4_jax.config import Small4Config
    from small4_jax.nn.model import abstract_model

    model = abstract_model(Small4Config.from_yaml(ROOT / "configs" / "tiny.yaml"))
    assert not [p for p in lora.select_targets(model, ["all", r".*proj.*"]) if "multi_modal" in p]
    assert lora.select_targets(model, ["linear_1"]) == ["multi_modal_projector.linear_1"]
    assert len(lora.select_targets(model, ["projector"])) == 3


def test_lora_run_on_image_rows(tmp_path):
    """Three steps of a LoRA run on image rows (the tiny preset with its vision block) with adapters on attention
    and on the projector: the encoder stays frozen, the projector's adapters learn inside the loss."""
    targets = ["attention", "projector"]
    from small4_jax.lora import adapters as lora
    from train.trainer import build_model, restore_lora, train

    rows = [_row(i, (28 * (1 + i % 3), 56)) for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    d = {"base": {"seed": 0, "dtype": "float32", "tokenizer": str(TEKKEN)}, "model": model,
         "lora": {"targets": targets, "rank": 4, "alpha": 8.0},
         "data": {"train": [str(tmp_path / "train.jsonl")], "seq_len": 128, "seed": 0},
         "optim": {"lr": 1e-2, "warmup_steps": 0},
         "train": {"out_dir": str(tmp_path / "run"), "steps": 3, "batch_size": 2, "grad_accum": 2,
                   "ckpt_every": 3, "log_every": 1000, "eval_every": 0}}
    cfg = run_config.from_dict(d)
    records = train(cfg)
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    trained = build_model(cfg)
    restore_lora(trained, tmp_path / "run")
    projector = {p: a for p, a in lora.adapters(trained).items() if p.startswith("multi_modal_projector.")}
    assert sorted(projector) == ["multi_modal_projector.linear_1", "multi_modal_projector.linear_2",
                                 "multi_modal_projector.patch_merger.merging_layer"]
    assert all(np.abs(np.asarray(a.lora_b[...])).max() > 0 for a in projector.values())  # B starts at 0
