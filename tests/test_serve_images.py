"""Image parts through `infer.serve` and the official `openai` client, against transformers' Mistral3 greedy generate.

A tiny random Mistral3 with Small 4's image geometry (patch 14, merge 2) and the bundled tiny tekken.json (Small 4's
image settings): the server's answer equals transformers' greedy generation on mistral-common's ids and pixels for
the same chat; bad image parts are 400s naming the message and part; an image too large for the context is refused
before anything runs; local files only under --image-dir.
"""

import base64
import io

import numpy as np
import openai
import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image
from test_vision import tiny_mistral3

import small4_jax
from infer.chat import parse_output
from infer.engine.engine import Engine
from infer.serve import Running, Server
from small4_jax.inputs.tokenizer import ASSETS_DIR, load_tokenizer

CONTEXT = 256


def _png(size, seed):
    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _url(data):
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _image(url):
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = tiny_mistral3(seed=5, patch=14, image_size=1540, vocab_size=512, eos_token_id=2,
                       max_position_embeddings=CONTEXT)
    path = tmp_path_factory.mktemp("mistral3")
    hf.save_pretrained(str(path))
    images = tmp_path_factory.mktemp("images")
    (images / "cat.png").write_bytes(_png((70, 40), 9))
    model = small4_jax.from_pretrained(path, dtype="float32")
    tok = load_tokenizer(ASSETS_DIR / "tiny_tekken.json")
    engine = Engine(model, tok, max_batch=4, page_size=16, prefill_chunk=32, batch_buckets=(4,), page_buckets=(16,))
    server = Running(Server(engine, tok, "tiny-vision", image_dir=str(images)))
    try:
        yield hf, tok, server, images
    finally:
        server.stop()


def _hf_greedy(hf, tok, messages, n):
    enc = tok.mistral_tokenizer().encode_chat_completion(ChatCompletionRequest.from_openai(messages))
    pixel = [torch.tensor(im) for im in enc.images]
    h, w = max(p.shape[1] for p in pixel), max(p.shape[2] for p in pixel)
    batch = torch.zeros(len(pixel), 3, h, w)
    for i, p in enumerate(pixel):
        batch[i, :, : p.shape[1], : p.shape[2]] = p
    with torch.no_grad():
        seq = hf.generate(input_ids=torch.tensor([enc.tokens]), pixel_values=batch,
                          image_sizes=torch.tensor([list(p.shape[1:]) for p in pixel]), max_new_tokens=n,
                          do_sample=False, eos_token_id=2, pad_token_id=11)
    return enc.tokens, seq[0, len(enc.tokens):].tolist()


def test_image_chat_equals_transformers(setup):
    hf, tok, server, images = setup
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": [_image(_url(_png((84, 56), 1))), _image(_url(_png((30, 60), 2))),
                                             {"type": "text", "text": "what is in them?"}]}]
    r = client.chat.completions.create(model="tiny-vision", messages=messages, max_tokens=8, temperature=0)
    ids, ref = _hf_greedy(hf, tok, messages, 8)
    assert r.choices[0].message.content == parse_output(tok, ref).content
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref)
    # a file under --image-dir is the same image as its bytes inline
    by_file = client.chat.completions.create(
        model="tiny-vision", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [_image("cat.png"), {"type": "text", "text": "and this?"}]}])
    inline = [{"role": "user", "content": [_image(_url((images / "cat.png").read_bytes())),
                                           {"type": "text", "text": "and this?"}]}]
    assert by_file.choices[0].message.content == parse_output(tok, _hf_greedy(hf, tok, inline, 8)[1]).content


def test_bad_images_are_400s_naming_the_part(setup):
    _, _, server, _ = setup
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    png = _png((40, 40), 3)
    cases = [
        (_url(png[:100]), r"messages\[1\]\.content\[1\]: truncated or corrupt image"),
        ("data:image/png;base64,", r"messages\[1\]\.content\[1\]: the image is empty"),
        (_url(b"GIF87a not really"), r"messages\[1\]\.content\[1\]: (not an image|truncated or corrupt)"),
        ("http://127.0.0.1:1/cat.png", r"messages\[1\]\.content\[1\]: image URLs are not fetched"),
        ("/etc/hostname", r"messages\[1\]\.content\[1\]: image file '/etc/hostname' is outside the allowed"),
    ]
    for url, match in cases:
        messages = [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "look"}, _image(url)]}]
        with pytest.raises(openai.BadRequestError, match=match) as e:
            client.chat.completions.create(model="tiny-vision", messages=messages, max_tokens=4)
        assert e.value.status_code == 400 and e.value.body["param"] == "messages[1].content[1]"
    # 1540 x 1540 is 3080 tokens: refused by the context check before the encoder runs
    big = [{"role": "user", "content": [_image(_url(_png((1540, 1540), 4)))]}]
    with pytest.raises(openai.BadRequestError, match=f"model's context is {CONTEXT}"):
        client.chat.completions.create(model="tiny-vision", messages=big, max_tokens=4)
    # the server still answers
    ok = client.chat.completions.create(model="tiny-vision", max_tokens=2,
                                        messages=[{"role": "user", "content": [_image(_url(png))]}])
    assert ok.choices[0].finish_reason in ("stop", "length")
