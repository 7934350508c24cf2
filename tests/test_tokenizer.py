"""Tests for small4_jax.inputs.tokenizer: the bundled sentencepiece model, tekken files checked against mistral-common,
the streaming detokeniser, file discovery and error messages. CPU only, a few seconds."""

import base64
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from small4_jax.errors import TokenizerError
from small4_jax.inputs.tokenizer import (
    TINY_SPM_PATH,
    SentencePieceTokenizer,
    StreamDecoder,
    TekkenTokenizer,
    default_tokenizer,
    load_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "Hello, world!",
    "The model reads a long book today.",
    "  two  spaces, a tab\tand\nnew lines\n",
    "Le café est très bon; Straße, naïve, señor.",
    "日本語のテキスト и немного кириллицы",
    "emoji: 🙂👍🏽 and 🇫🇷 flags",
    "x = [1, 2, 3]  # 1234567890",
    "[INST] is plain text here",
    "",
]

# ---------------------------------------------------------------------------------------------------------------
# sentencepiece: the bundled tiny model


@pytest.fixture(scope="module")
def spm_tok():
    return default_tokenizer()


def test_bundled_model_ids(spm_tok):
    assert isinstance(spm_tok, SentencePieceTokenizer)
    assert spm_tok.path == TINY_SPM_PATH
    assert spm_tok.vocab_size == 512
    assert (spm_tok.unk_id, spm_tok.bos_id, spm_tok.eos_id, spm_tok.pad_id) == (0, 1, 2, None)
    expected = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[ARGS]", "[THINK]", "[/THINK]"]
    assert [spm_tok.token_id(p) for p in expected] == list(range(3, 15))
    assert (spm_tok.token_id("<unk>"), spm_tok.token_id("<s>"), spm_tok.token_id("</s>")) == (0, 1, 2)
    assert spm_tok.special_ids == set(range(15))
    assert TINY_SPM_PATH.stat().st_size < 300_000


def test_bundled_model_matches_script():
    """The committed model is what assets/make_tiny_tokenizer.py trains (same pieces, scores and types)."""
    script = REPO / "small4_jax" / "assets" / "make_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = spm.SentencePieceProcessor(model_proto=module.build_model_bytes())
    bundled = spm.SentencePieceProcessor(model_file=str(TINY_SPM_PATH))

    def table(sp):
        return [(sp.id_to_piece(i), sp.get_score(i), sp.is_control(i), sp.is_byte(i)) for i in range(sp.vocab_size())]

    assert table(fresh) == table(bundled)


@pytest.mark.parametrize("text", TEXTS)
def test_spm_round_trip(spm_tok, text):
    ids = spm_tok.encode(text)
    assert ids[0] == spm_tok.bos_id
    assert all(0 <= i < 512 for i in ids)
    assert spm_tok.decode(ids) == text
    assert spm_tok.decode(ids, skip_special=False) == "<s>" + text


def test_spm_byte_fallback_and_specials_not_from_text(spm_tok):
    ids = spm_tok.encode("🙂", bos=False)
    assert [spm_tok.processor.id_to_piece(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    # Without allow_special, "[INST]" typed by a user is ordinary text.
    plain = spm_tok.encode("[INST]", bos=False)
    assert len(plain) > 1 and not set(plain) & spm_tok.special_ids


def test_spm_bos_eos_flags(spm_tok):
    body = spm_tok.encode("Hello there", bos=False)
    assert spm_tok.encode("Hello there") == [1, *body]
    assert spm_tok.encode("Hello there", eos=True) == [1, *body, 2]
    assert spm_tok.encode("Hello there", bos=False, eos=True) == [*body, 2]
    assert spm_tok.encode("") == [1]
    assert spm_tok.encode("", bos=False) == []
    assert spm_tok.decode([1, *body, 2]) == "Hello there"


def test_spm_allow_special(spm_tok):
    assert spm_tok.encode("[INST]", bos=False, allow_special=True) == [3]
    text = "[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Hello[/INST]The answer.</s>"
    ids = spm_tok.encode(text, bos=True, allow_special=True)
    piece = lambda s: spm_tok.encode(s, bos=False)  # noqa: E731
    assert ids == [1, 10, *piece("Be brief."), 11, 3, *piece("Hello"), 4, *piece("The answer."), 2]
    assert spm_tok.decode(ids, skip_special=False) == "<s>" + text
    assert spm_tok.decode(ids) == "Be brief. Hello The answer."
    with pytest.raises(TokenizerError, match=r"no special token '\[NOPE\]'"):
        spm_tok.token_id("[NOPE]")


def test_spm_decode_checks_ids(spm_tok):
    with pytest.raises(TokenizerError, match="out of range"):
        spm_tok.decode([1, 512])
    with pytest.raises(TokenizerError, match="str"):
        spm_tok.encode(b"bytes")


def _stream(tok, ids, skip_special=True):
    dec = StreamDecoder(tok, skip_special=skip_special)
    chunks = [dec.push(i) for i in ids]
    return chunks, dec.flush()


@pytest.mark.parametrize("skip_special", [True, False])
def test_spm_stream_decoder(spm_tok, skip_special):
    text = "[INST]Say 日本 and 🙂👍🏽![/INST] Sure: café 🇫🇷 done.</s>"
    ids = spm_tok.encode(text, allow_special=True)
    chunks, tail = _stream(spm_tok, ids, skip_special)
    assert "".join(chunks) + tail == spm_tok.decode(ids, skip_special=skip_special)
    assert tail == ""
    assert not any("\ufffd" in c for c in chunks)
    assert chunks.count("") >= 10  # held back inside byte-fallback sequences (and for control tokens when skipped)
    assert "🙂" in chunks and "日" in chunks


def test_stream_decoder_incomplete_tail(spm_tok):
    ids = spm_tok.encode("ok 🙂", bos=False)[:-2]  # cut inside the emoji's four bytes
    chunks, tail = _stream(spm_tok, ids)
    assert "".join(chunks) == "ok "
    assert tail == spm_tok.decode(ids)[3:] == "\ufffd\ufffd"
    assert spm_tok.stream_decoder().flush() == ""


# ---------------------------------------------------------------------------------------------------------------
# tekken: a tiny tekken.json built here, checked against mistral-common

# The pre-tokenisation pattern of Mistral's tekken files (e.g. tekken_240911.json).
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
V7_SPECIALS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
]
V13_SPECIALS = V7_SPECIALS + ["[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]"]
BPE_CORPUS = [
    "hello world, the model reads the book and the user writes the answer.",
    "Hello there! The weather is nice; the answer is here.",
    "café au lait, très bien — déjà vu. naïve über straße",
    "the the the hello hello world world answer answer reads writes",
]


def train_byte_bpe(corpus: list[str], num_merges: int) -> list[bytes]:
    """Tiny byte-level BPE (the trainer behind the bundled tiny_tekken.json): the 256 bytes plus `num_merges` merged
    tokens, each the concatenation of two existing tokens, so tiktoken can reach it by merging."""
    from small4_jax.assets.make_tiny_tekken import train_byte_bpe as train

    return train(corpus, 256 + num_merges)


def write_tekken(path: Path, specials: list[str], num_special: int, version: str, num_merges: int = 60) -> Path:
    vocab = train_byte_bpe(BPE_CORPUS, num_merges)
    assert len(vocab) > 256 + 40

    def token_str(b: bytes):
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return None

    data = {
        "config": {
            "pattern": TEKKEN_PATTERN,
            "num_vocab_tokens": len(vocab),
            "default_vocab_size": len(vocab) + num_special,
            "default_num_special_tokens": num_special,
            "version": version,
        },
        "vocab": [
            {"rank": i, "token_bytes": base64.b64encode(b).decode("ascii"), "token_str": token_str(b)}
            for i, b in enumerate(vocab)
        ],
        "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(specials)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tekken_v7(tmp_path_factory):
    return write_tekken(tmp_path_factory.mktemp("v7") / "tekken.json", V7_SPECIALS, 24, "v7")


@pytest.fixture(scope="module")
def tekken_v13(tmp_path_factory):
    return write_tekken(tmp_path_factory.mktemp("v13") / "tekken.json", V13_SPECIALS, 32, "v13")


def _reference(path):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    return Tekkenizer.from_file(path)


def test_module_import_does_not_touch_mistral_common():
    code = "import sys, small4_jax.inputs.tokenizer; assert 'mistral_common' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("fixture", ["tekken_v7", "tekken_v13"])
def test_tekken_plain_encode_matches_mistral_common(request, fixture):
    path = request.getfixturevalue(fixture)
    tok, ref = TekkenTokenizer(path), _reference(path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, bos=True, eos=False), text
        assert tok.encode(text, bos=False, eos=True) == ref.encode(text, bos=False, eos=True)
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special=False) == "<s>" + text
    # Merges are used: common words take fewer tokens than bytes.
    assert len(tok.encode(" the hello world", bos=False)) < len(" the hello world")


def test_tekken_ids(tekken_v7, tekken_v13):
    tok = TekkenTokenizer(tekken_v7)
    ref = _reference(tekken_v7)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 11)
    assert tok.vocab_size == ref.n_words
    assert tok.special_ids == set(range(24)) == ref.special_ids
    assert tok.token_id("[INST]") == 3 and tok.token_id("<SPECIAL_23>") == 23
    with pytest.raises(TokenizerError, match=r"no special token '\[THINK\]'"):
        tok.token_id("[THINK]")
    tok13 = TekkenTokenizer(tekken_v13)
    assert (tok13.token_id("[THINK]"), tok13.token_id("[/THINK]")) == (22, 23)
    assert tok13.special_ids == set(range(32))


def test_tekken_without_pad(tmp_path):
    path = write_tekken(tmp_path / "tekken.json", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], 8, "v7")
    tok = TekkenTokenizer(path)
    assert tok.pad_id is None and tok.token_id("<SPECIAL_7>") == 7


@pytest.mark.parametrize(
    "fixture,text",
    [
        ("tekken_v7", "[INST]hello[/INST]"),
        ("tekken_v7", "<s>[INST] What is the answer? [/INST]The answer is here.</s>"),
        ("tekken_v7", "[SYSTEM_PROMPT]be nice[/SYSTEM_PROMPT][INST]café[/INST][INST][/INST]"),
        ("tekken_v13", "[INST]hello[/INST][THINK]hmm, the user…[/THINK]Hello! 🙂</s>"),
    ],
)
def test_tekken_allow_special_matches_mistral_common(request, fixture, text):
    path = request.getfixturevalue(fixture)
    tok, ref = TekkenTokenizer(path), _reference(path)
    specials = re.compile(r"(<s>|</s>|\[/?[A-Z_]+\])")
    expected = [ref.bos_id]
    for part in specials.split(text):
        if specials.fullmatch(part):
            expected.append(ref.get_special_token(part))
        elif part:
            expected.extend(ref.encode(part, bos=False, eos=False))
    ids = tok.encode(text, allow_special=True)
    assert ids == expected
    assert set(ids) & ref.special_ids
    assert tok.decode(ids, skip_special=False) == "<s>" + text
    assert tok.decode(ids) == specials.sub("", text)
    # Without allow_special the special strings are ordinary text.
    plain = tok.encode(text, bos=False)
    assert plain == ref.encode(text, bos=False, eos=False) and not set(plain) & ref.special_ids


@pytest.mark.parametrize("skip_special", [True, False])
def test_tekken_stream_decoder(tekken_v13, skip_special):
    tok = TekkenTokenizer(tekken_v13)
    ids = tok.encode("[THINK]日本 🙂[/THINK]café 👍🏽 done</s>", allow_special=True)
    chunks, tail = _stream(tok, ids, skip_special)
    assert "".join(chunks) + tail == tok.decode(ids, skip_special=skip_special)
    assert tail == "" and not any("\ufffd" in c for c in chunks)
    assert "🙂" in chunks


def test_tekken_mistral_tokenizer(tekken_v13, tmp_path):
    mt = TekkenTokenizer(tekken_v13).mistral_tokenizer()
    assert mt.instruct_tokenizer.tokenizer.encode("hello", bos=True, eos=False) == _reference(tekken_v13).encode(
        "hello", bos=True, eos=False
    )
    other = tmp_path / "vocab.json"
    shutil.copy(tekken_v13, other)
    with pytest.raises(TokenizerError, match=r"vocab\.json.*tekken"):
        TekkenTokenizer(other).mistral_tokenizer()
    with pytest.raises(TokenizerError, match="only available for tekken"):
        default_tokenizer().mistral_tokenizer()


# ---------------------------------------------------------------------------------------------------------------
# load_tokenizer and errors


def test_load_tokenizer_files_and_dirs(tmp_path, tekken_v7):
    assert isinstance(load_tokenizer(TINY_SPM_PATH), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tekken_v7), TekkenTokenizer)
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(TINY_SPM_PATH, both / "tokenizer.model")
    shutil.copy(tekken_v7, both / "tekken.json")
    assert isinstance(load_tokenizer(both), TekkenTokenizer)  # tekken.json preferred
    spm_dir = tmp_path / "spm"
    spm_dir.mkdir()
    shutil.copy(TINY_SPM_PATH, spm_dir / "tokenizer.model.v3")
    (spm_dir / "config.json").write_text("{}")
    tok = load_tokenizer(spm_dir)
    assert isinstance(tok, SentencePieceTokenizer) and tok.path == spm_dir / "tokenizer.model.v3"
    any_dir = tmp_path / "any"
    any_dir.mkdir()
    shutil.copy(TINY_SPM_PATH, any_dir / "tiny.model")
    assert load_tokenizer(any_dir).path == any_dir / "tiny.model"


def test_load_tokenizer_errors(tmp_path):
    empty = tmp_path / "ckpt"
    empty.mkdir()
    (empty / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(empty)
    assert f"no tokenizer found in directory {empty}" in str(e.value) and "tokenizer.json" in str(e.value)
    missing = tmp_path / "nothing_here"
    with pytest.raises(TokenizerError, match=re.escape(f"tokenizer path does not exist: {missing}")):
        load_tokenizer(missing)
    weird = tmp_path / "vocab.txt"
    weird.write_text("a b c")
    with pytest.raises(TokenizerError, match=re.escape(f"unrecognised tokenizer file {weird}")):
        load_tokenizer(weird)


def test_spm_file_errors(tmp_path):
    missing = tmp_path / "tokenizer.model"
    with pytest.raises(TokenizerError) as e:
        SentencePieceTokenizer(missing)
    assert str(e.value) == f"sentencepiece model file not found: {missing}"
    corrupt = tmp_path / "bad.model"
    corrupt.write_bytes(b"this is not a protobuf")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(corrupt)
    assert str(e.value).startswith(f"{corrupt} is not a valid sentencepiece model")


def test_tekken_file_errors(tmp_path, tekken_v7):
    missing = tmp_path / "tekken.json"
    with pytest.raises(TokenizerError) as e:
        TekkenTokenizer(missing)
    assert str(e.value) == f"tekken tokenizer file not found: {missing}"
    corrupt = tmp_path / "corrupt" / "tekken.json"
    corrupt.parent.mkdir()
    corrupt.write_text('{"config": {"pattern": ')
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(corrupt.parent)
    assert str(e.value).startswith(f"{corrupt} is not a valid tekken.json tokenizer file (JSONDecodeError")
    no_vocab = tmp_path / "no_vocab" / "tekken.json"
    no_vocab.parent.mkdir()
    data = json.loads(tekken_v7.read_text())
    del data["vocab"]
    no_vocab.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=re.escape(f"{no_vocab} is not a valid tekken.json")):
        TekkenTokenizer(no_vocab)
    bad_version = tmp_path / "bad_version" / "tekken.json"
    bad_version.parent.mkdir()
    data = json.loads(tekken_v7.read_text())
    data["config"]["version"] = "v99"
    bad_version.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="Unknown version: v99"):
        TekkenTokenizer(bad_version)


# ---------------------------------------------------------------------------------------------------------------
# Real tokenizer files shipped inside the mistral-common wheel


def _mistral_common_data(name: str) -> Path:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / name
    if not path.is_file():
        pytest.skip(f"{name} not shipped with this mistral-common")
    return path


def test_real_tekken_v3():
    tok = load_tokenizer(_mistral_common_data("tekken_240911.json"))
    assert isinstance(tok, TekkenTokenizer)
    assert tok.encode("Hello, world!") == [1, 22177, 1044, 4304, 1033]
    assert tok.vocab_size == 131072 and tok.pad_id == 11 and len(tok.special_ids) == 1000
    assert tok.encode("[INST]Hi[/INST]", allow_special=True)[:2] == [1, 3]


def test_real_spm_v7():
    tok = load_tokenizer(_mistral_common_data("mistral_instruct_tokenizer_241114.model.v7"))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.token_id("[INST]"), tok.token_id("[SYSTEM_PROMPT]")) == (32768, None, 3, 16)
    text = "Hello, world! 🙂"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("which", ["spm", "tekken"])
@pytest.mark.parametrize("skip_special", [True, False])
def test_stream_decoder_equals_full_decode_on_random_ids(spm_tok, tekken_v13, which, skip_special):
    """Random ids (byte tokens cut from their characters, control tokens, spaces) decoded through the window."""
    import numpy as np

    tok = spm_tok if which == "spm" else TekkenTokenizer(tekken_v13)
    rng = np.random.default_rng(3)
    specials = sorted(tok.special_ids)
    for trial in range(20):
        ids = rng.integers(0, tok.vocab_size, int(rng.integers(1, 60))).tolist()
        ids = [specials[int(rng.integers(len(specials)))] if rng.random() < 0.1 else t for t in ids]
        dec = StreamDecoder(tok, skip_special=skip_special)
        out = "".join(dec.push(t) for t in ids) + dec.flush()
        assert out == tok.decode(ids, skip_special=skip_special), (trial, ids)
