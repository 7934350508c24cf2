"""Image chats: token ids and pixel arrays equal mistral-common's encode_chat_completion; bad images get clear errors.

The reference is called directly (`MistralTokenizer.encode_chat_completion` on `ChatCompletionRequest.from_openai`
of the same messages, images as data: URLs); ours goes through infer.chat.encode_chat and small4_jax.inputs.images.
"""

import base64
import io

import numpy as np
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from infer.chat import encode_chat
from small4_jax.errors import InputError
from small4_jax.inputs.images import image_hash
from small4_jax.inputs.tokenizer import ASSETS_DIR, load_tokenizer

IMG, BREAK, END = 10, 12, 13


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ASSETS_DIR / "tiny_tekken.json")


@pytest.fixture(scope="module")
def reference():
    return MistralTokenizer.from_file(str(ASSETS_DIR / "tiny_tekken.json"))


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _url(data: bytes, fmt: str = "png") -> str:
    return f"data:image/{fmt};base64," + base64.b64encode(data).decode()


def _image(mode, size, seed=0):
    rng = np.random.RandomState(seed)
    w, h = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    a = rng.randint(0, 256, (h, w, channels), dtype=np.uint8)
    if mode == "RGBA":
        a[..., 3] = np.where(np.arange(w)[None, :] < w // 2, 0, 255)  # half transparent: composited on white
    return Image.fromarray(a[..., 0] if channels == 1 else a, mode)


def _part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def _check_equal(tok, reference, messages):
    ours = encode_chat(tok, messages)
    ref = reference.encode_chat_completion(ChatCompletionRequest.from_openai(messages))
    assert ours.ids == list(ref.tokens)
    assert len(ours.images) == len(ref.images)
    for a, b in zip(ours.images, ref.images, strict=True):
        np.testing.assert_array_equal(a, b)
    return ours


IMAGES = {
    "rgb_1024x768": (lambda: _encode(_image("RGB", (1024, 768))), "png", (37, 28)),
    "rgba_50x30": (lambda: _encode(_image("RGBA", (50, 30), 1)), "png", (2, 2)),
    "gray_300x500": (lambda: _encode(_image("L", (300, 500), 2)), "png", (11, 18)),
    "one_pixel": (lambda: _encode(_image("RGB", (1, 1), 3)), "png", (1, 1)),
    "jpeg_4000x3000": (lambda: _encode(_image("RGB", (4000, 3000), 4).resize((4000, 3000)), "JPEG"), "jpeg", (55, 42)),
    "grid_29x28": (lambda: _encode(_image("RGB", (29, 28), 5)), "png", (2, 1)),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_one_image_matches_mistral_common(tok, reference, name):
    make, fmt, (gw, gh) = IMAGES[name]
    messages = [{"role": "user", "content": [_part(_url(make(), fmt)), {"type": "text", "text": "what is this"}]}]
    ours = _check_equal(tok, reference, messages)
    assert ours.ids.count(IMG) == gw * gh and ours.ids.count(BREAK) == gh - 1 and ours.ids.count(END) == 1
    assert ours.images[0].shape == (3, 28 * gh, 28 * gw)
    assert ours.image_hashes == [image_hash(ours.images[0])]


def test_rgba_is_composited_on_white(tok):
    a = np.zeros((28, 56, 4), np.uint8)  # left half transparent black, right half opaque black
    a[:, 28:, 3] = 255
    prompt = encode_chat(tok, [{"role": "user", "content": [_part(_url(_encode(Image.fromarray(a, "RGBA"))))]}])
    img = prompt.images[0]
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(img[:, 14, 5], (1 - mean) / std, rtol=1e-5)  # white
    np.testing.assert_allclose(img[:, 14, 50], (0 - mean) / std, rtol=1e-5)  # black


def test_two_images_and_two_turns(tok, reference):
    a, b, c = (_url(_encode(_image("RGB", s, i))) for i, s in enumerate([(64, 40), (30, 90), (200, 100)]))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "compare"}, _part(a), _part(b)]},
        {"role": "assistant", "content": "the first is wider"},
        {"role": "user", "content": [_part(c), {"type": "text", "text": "and this one?"}]},
    ]
    ours = _check_equal(tok, reference, messages)
    assert len(ours.images) == 3 and len(set(ours.image_hashes)) == 3
    again = encode_chat(tok, messages)
    assert again.image_hashes == ours.image_hashes  # content hash: same pixels, same key


def _bad(tok, content, match, **kw):
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": content}]
    with pytest.raises(InputError, match=match):
        encode_chat(tok, messages, **kw)


def test_bad_images_are_refused_with_the_part_named(tok, tmp_path):
    png = _encode(_image("RGB", (40, 40)))
    _bad(tok, [{"type": "text", "text": "hi"}, _part("data:image/png;base64,")],
         r"^messages\[1\]\.content\[1\]: the image is empty \(0 bytes\)$")
    _bad(tok, [_part(_url(png[: len(png) // 2]))], r"^messages\[1\]\.content\[0\]: truncated or corrupt image")
    _bad(tok, [_part(_url(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4))],
         r"^messages\[1\]\.content\[0\]: (truncated or corrupt image|not an image in a supported format)")
    _bad(tok, [_part(_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "svg+xml"))],
         r"^messages\[1\]\.content\[0\]: not an image in a supported format")
    _bad(tok, [_part("data:image/png;base64,@@@notbase64")], r"payload is not valid base64")
    _bad(tok, [_part("data:image/png,rawbytes")], r"must be 'data:image/...;base64,<payload>'")
    _bad(tok, [_part("https://example.com/cat.png")], r"^messages\[1\]\.content\[0\]: image URLs are not fetched")
    _bad(tok, [{"type": "image_url"}], r"an image part needs")
    (tmp_path / "ok.png").write_bytes(png)
    _bad(tok, [_part(str(tmp_path / "ok.png"))], r"local image files are not allowed here")
    _bad(tok, [_part("file:///etc/passwd")], r"outside the allowed image directory", image_dir=tmp_path / "sub")
    _bad(tok, [_part("../ok.png")], r"outside the allowed image directory", image_dir=tmp_path / "sub")
    with pytest.raises(InputError, match=r"images are only accepted in user messages"):
        encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [_part(_url(png))]}])
    with pytest.raises(InputError, match="images need a tekken.json tokenizer"):
        encode_chat(load_tokenizer(ASSETS_DIR / "tiny_spm.model"), [{"role": "user", "content": [_part(_url(png))]}])


def test_local_files_inside_the_allowed_directory(tok, reference, tmp_path):
    png = _encode(_image("RGB", (60, 30)))
    (tmp_path / "a.png").write_bytes(png)
    by_path = encode_chat(tok, [{"role": "user", "content": [_part("a.png")]}], image_dir=tmp_path)
    by_url = encode_chat(tok, [{"role": "user", "content": [_part(f"file://{tmp_path / 'a.png'}")]}],
                         image_dir=tmp_path)
    inline = _check_equal(tok, reference, [{"role": "user", "content": [_part(_url(png))]}])
    assert by_path.ids == by_url.ids == inline.ids and by_path.image_hashes == inline.image_hashes


def test_generate_cli_with_images(tmp_path, capsys):
    """`infer.generate --chat --image A --image B` (through the engine) = generation.generate on mistral-common's ids
    and pixels for the same messages, on the tiny preset with its vision block."""
    import json

    from infer.generate import main
    from small4_jax.config import Small4Config
    from dense_reference import dense_generate as generate
    from small4_jax.nn.model import init_model

    tiny = ASSETS_DIR.parent.parent / "configs" / "tiny.yaml"
    paths = []
    for i, (size, mode) in enumerate([((60, 40), "RGB"), ((30, 70), "RGBA")]):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(_encode(_image(mode, size, i)))
    argv = ["--config", str(tiny), "--max-model-len", "256", "--prefill-chunk", "16", "--max-new-tokens", "6",
            "--chat", "--prompt", "compare them", "--json"]
    assert main(argv + ["--image", str(paths[0]), "--image", str(paths[1])]) == 0
    result = json.loads(capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)[-1])
    messages = [{"role": "user", "content": [_part(_url(p.read_bytes())) for p in paths] +
                 [{"type": "text", "text": "compare them"}]}]
    ref = MistralTokenizer.from_file(str(ASSETS_DIR / "tiny_tekken.json")).encode_chat_completion(
        ChatCompletionRequest.from_openai(messages))
    model = init_model(Small4Config.from_yaml(tiny), seed=0)
    assert result["token_ids"] == generate(model, ref.tokens, max_new_tokens=6, stop_ids=[2], images=ref.images)
    assert main(argv + ["--image", str(tmp_path / "missing.png")]) == 2
    assert f"error: --image {tmp_path / 'missing.png'}: cannot read the file" in capsys.readouterr().err
