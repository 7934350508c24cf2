"""Tokenizers: one interface over Mistral's two file formats, plus an incremental detokeniser for streaming.

- `SentencePieceTokenizer` reads a sentencepiece `.model` file (`tokenizer.model`, `tokenizer.model.v3`, ...).
- `TekkenTokenizer` reads a `tekken.json` (tiktoken-style byte-level BPE) through mistral-common, which is
  imported only when such a tokenizer is created.
- `load_tokenizer(path)` picks the right one for a file or a checkpoint directory.
- `default_tokenizer()` is the tiny sentencepiece model bundled in `small4_jax/assets/` (512 tokens), for the tiny
  test model; `assets/make_tiny_tokenizer.py` rebuilds it and documents its ids.
- `StreamDecoder` turns token ids arriving one at a time into printable text.

Special (control) tokens such as "[INST]" or "</s>" are never produced from plain text: the string "[INST]" typed
by a user is encoded as ordinary text. Pass `allow_special=True` to `encode` to map such strings to their ids,
which is what prompt templates want. Every failure is raised as `TokenizerError` naming the file.
"""

import abc
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from small4_jax.errors import TokenizerError
from small4_jax.inputs.canonical import Canon

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
TINY_SPM_PATH = ASSETS_DIR / "tiny_spm.model"

_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(abc.ABC):
    """Common interface of the tokenizer backends.

    Subclasses set `path` and `_special_map` (special token string -> id) and call `_compile_specials()` in
    `__init__`, and implement `_encode_text` (plain text, no specials, no BOS/EOS), `decode` and the id properties;
    `encode`, `token_id` and `stream_decoder` are shared.
    """

    path: Path
    _special_map: dict[str, int]
    _special_regex: re.Pattern | None

    # ---- backend hooks -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Encode plain text, treating special token strings as text; no BOS/EOS."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of `ids`. With `skip_special` control tokens (BOS, EOS, [INST], ...) are dropped, otherwise they
        appear as their strings ("[INST]"). Incomplete UTF-8 sequences decode to U+FFFD."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are 0 .. vocab_size - 1)."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int:
        """Id of the beginning-of-sequence token "<s>"."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """Id of the end-of-sequence token "</s>"."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int | None:
        """Id of the padding token, or None when the tokenizer has none."""

    @property
    @abc.abstractmethod
    def unk_id(self) -> int:
        """Id of the unknown token "<unk>"."""

    @property
    @abc.abstractmethod
    def special_ids(self) -> frozenset[int]:
        """Ids of all control tokens (unk, BOS, EOS, [INST], ...): the ids `decode(skip_special=True)` drops."""

    # ---- shared --------------------------------------------------------------------------------------------------

    def encode(self, text: str, *, bos: bool = True, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, with BOS prepended and EOS appended when asked.

        With `allow_special=True`, substrings equal to a special token string ("[INST]", "</s>", ...) become that
        token's id and the text between them is encoded on its own; otherwise they are encoded as plain text.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"{self.path}: can only encode a str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        if allow_special:
            for piece, special_id in self._split_special(text):
                ids.extend([special_id] if special_id is not None else self._encode_text(piece))
        else:
            ids.extend(self._encode_text(text))
        if eos:
            ids.append(self.eos_id)
        return ids

    def token_id(self, piece: str) -> int:
        """Id of the special token `piece`, e.g. "[INST]" or "</s>"; TokenizerError if there is no such token."""
        try:
            return self._special_map[piece]
        except KeyError:
            raise TokenizerError(f"{self.path}: no special token {piece!r} in this tokenizer") from None

    def stream_decoder(self, *, skip_special: bool = True) -> "StreamDecoder":
        """A new `StreamDecoder` over this tokenizer."""
        return StreamDecoder(self, skip_special=skip_special)

    def mistral_tokenizer(self):
        """The mistral-common `MistralTokenizer` for chat formatting; only tekken tokenizers provide one here."""
        raise TokenizerError(f"{self.path}: a mistral-common MistralTokenizer is only available for tekken.json files")

    def _compile_specials(self) -> None:
        """Build the regex `_split_special` uses; the longest special string wins where several match."""
        pieces = sorted(self._special_map, key=lambda p: (-len(p), p))
        self._special_regex = re.compile("|".join(re.escape(p) for p in pieces)) if pieces else None

    def _split_special(self, text: str) -> Iterator[tuple[str, int | None]]:
        """Yield (substring, special id or None for plain text), covering `text` in order."""
        start = 0
        for match in self._special_regex.finditer(text) if self._special_regex is not None else ():
            if match.start() > start:
                yield text[start : match.start()], None
            yield match.group(), self._special_map[match.group()]
            start = match.end()
        if start < len(text):
            yield text[start:], None

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"{self.path}: token ids {bad[:5]} out of range 0..{self.vocab_size - 1}")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental detokeniser: feed generated ids one at a time, get the newly completed text back.

    Each push decodes only a small window, so its cost does not grow with the output: the window starts at the
    token where the previous emission's window ended (`_prefix`) and the text returned is
    decode(window + new ids) minus decode(window). Decoding from a token boundary inside the text is safe because
    both strings start at the same token, so what a backend does at the start of a decode (sentencepiece drops a
    leading dummy space, a byte token cut from its character decodes to U+FFFD) cancels in the difference.
    Text is held back while the window's text ends in U+FFFD (a multi-byte character still split across byte
    tokens) or has not grown (a skipped control token), so the concatenation of everything `push` and `flush`
    return is exactly `tokenizer.decode(all ids, skip_special=...)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._window: list[int] = []  # ids from the start of the current window
        self._read = 0  # ids of the window whose text has been returned

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes ("" while a character is still incomplete)."""
        self._window.append(int(token_id))
        decode = self.tokenizer.decode
        before = decode(self._window[: self._read], skip_special=self.skip_special) if self._read else ""
        text = decode(self._window, skip_special=self.skip_special)
        if len(text) <= len(before) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._window = self._window[self._read :]  # the next window starts at this one's read point
        self._read = len(self._window)
        return text[len(before) :]

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character comes out as U+FFFD)."""
        if len(self._window) == self._read:
            return ""
        before = self.tokenizer.decode(self._window[: self._read], skip_special=self.skip_special) if self._read else ""
        text = self.tokenizer.decode(self._window, skip_special=self.skip_special)
        self._window = self._window[self._read :]
        self._read = len(self._window)
        return text[len(before) :]


class SentencePieceTokenizer(Tokenizer):
    """Tokenizer over a sentencepiece `.model` file.

    Special tokens are the model's control pieces plus "<unk>". Encoding follows sentencepiece and mistral-common:
    a dummy prefix space is added to the text, and with `allow_special=True` to each text segment between special
    tokens ("[INST]Hi[/INST]" -> [INST] "▁Hi" [/INST]). `decode(skip_special=False)` inverts that exactly;
    `decode(skip_special=True)` is sentencepiece's own decoding with the specials removed ("Hi").
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"sentencepiece model file not found: {self.path}")
        try:
            self.processor = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.path} is not a valid sentencepiece model: {e}") from None
        sp = self.processor
        specials = [i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)]
        self._special_id_set = frozenset(specials)
        self._special_map = {sp.id_to_piece(i): i for i in specials}
        self._compile_specials()
        for name, value in (("bos", sp.bos_id()), ("eos", sp.eos_id())):
            if value < 0:
                raise TokenizerError(f"{self.path}: sentencepiece model has no {name} token, expected one")

    def _encode_text(self, text: str) -> list[int]:
        return self.processor.encode(text) if text else []

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        ids = self._check_ids(ids)
        if skip_special:
            return self.processor.decode([i for i in ids if i not in self._special_id_set])
        # Each run of ordinary ids between special tokens is decoded on its own, dropping its dummy-prefix space,
        # the inverse of `encode(..., allow_special=True)`, which adds one to each text segment.
        parts: list[str] = []
        run: list[int] = []
        for i in [*ids, None]:
            if i is None or i in self._special_id_set:
                if run:
                    parts.append(self.processor.decode(run))
                    run = []
                if i is not None:
                    parts.append(self.processor.id_to_piece(i))
            else:
                run.append(i)
        return "".join(parts)

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int | None:
        pad = self.processor.pad_id()
        return pad if pad >= 0 else None

    @property
    def unk_id(self) -> int:
        return self.processor.unk_id()

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_id_set


_CANON_LOCK = threading.Lock()


class TekkenTokenizer(Tokenizer):
    """Tokenizer over a `tekken.json` file, through mistral-common's `Tekkenizer`.

    Special tokens are the file's `special_tokens` (or mistral-common's defaults for files older than v7 that do
    not list them), including the "<SPECIAL_n>" fillers up to `default_num_special_tokens`; they take ids
    0 .. num_special - 1 and ordinary tokens follow.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"tekken tokenizer file not found: {self.path}")
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        try:
            self.tekkenizer = Tekkenizer.from_file(self.path)
        except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError) as e:  # JSONDecodeError too
            detail = f"{type(e).__name__}: {e}"
            raise TokenizerError(f"{self.path} is not a valid tekken.json tokenizer file ({detail[:300]})") from None
        tk = self.tekkenizer
        self._special_map = {t["token_str"]: t["rank"] for t in tk._all_special_tokens}
        for piece in ("<unk>", "<s>", "</s>"):
            if piece not in self._special_map:
                raise TokenizerError(f"{self.path}: tekken.json has no special token {piece!r}, expected one")
        self._compile_specials()
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        self._policies = {True: SpecialTokenPolicy.IGNORE, False: SpecialTokenPolicy.KEEP}  # by skip_special
        self._mistral_tokenizer = None

    def _encode_text(self, text: str) -> list[int]:
        return self.tekkenizer.encode(text, bos=False, eos=False) if text else []

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        policy = self._policies[bool(skip_special)]
        return self.tekkenizer.decode(self._check_ids(ids), special_token_policy=policy)

    @property
    def vocab_size(self) -> int:
        return self.tekkenizer.n_words

    @property
    def bos_id(self) -> int:
        return self._special_map["<s>"]

    @property
    def eos_id(self) -> int:
        return self._special_map["</s>"]

    @property
    def pad_id(self) -> int | None:
        return self._special_map.get("<pad>")

    @property
    def unk_id(self) -> int:
        return self._special_map["<unk>"]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.tekkenizer.special_ids)

    def canon(self):
        """The canonical-tokenisation tables of this vocabulary (`small4_jax.inputs.canonical.Canon`), built once (about a
        second for the 131K vocabulary) and shared by every structured-output request."""
        with _CANON_LOCK:
            if getattr(self, "_canon", None) is None:
                tk = self.tekkenizer
                model = tk._model  # tiktoken.Encoding: its ranks and regex are the tokenizer's definition
                self._canon = Canon(model._mergeable_ranks, model._pat_str, tk.num_special_tokens, tk.n_words)
                self._canon.encode = model.encode_ordinary  # text -> inner ranks, the exact reference
            return self._canon

    def mistral_tokenizer(self):
        """mistral-common's `MistralTokenizer` for this file (chat templates, tool calls), loaded once.

        mistral-common only recognises a tekken file whose name contains "tekken" and ends in ".json"
        (e.g. "tekken.json"); for any other name this raises TokenizerError: rename or link the file.
        """
        if self._mistral_tokenizer is None:
            if "tekken" not in self.path.name or self.path.suffix != ".json":
                raise TokenizerError(
                    f"{self.path}: mistral-common needs a tekken file named like '*tekken*.json' to build a "
                    "MistralTokenizer; rename or symlink it (e.g. to tekken.json)"
                )
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

            try:
                self._mistral_tokenizer = MistralTokenizer.from_file(str(self.path))
            except Exception as e:  # mistral-common raises assorted types for unsupported versions/configs
                raise TokenizerError(f"{self.path}: mistral-common cannot build a MistralTokenizer: {e}") from None
        return self._mistral_tokenizer


def _is_sentencepiece_name(name: str) -> bool:
    """tokenizer.model, foo.model, tokenizer.model.v3, tokenizer.model.v7m1, ..."""
    return name.endswith(".model") or re.search(r"\.model\.v\d+\w*$", name) is not None


def find_tokenizer_file(directory: str | Path) -> Path:
    """The tokenizer file of a checkpoint directory: tekken.json, else tokenizer.model, tokenizer.model.*, *.model."""
    directory = Path(directory)
    candidates = [directory / "tekken.json", directory / "tokenizer.model"]
    candidates += sorted(directory.glob("tokenizer.model.*"))
    candidates += sorted(directory.glob("*.model"))
    for candidate in candidates:
        if candidate.is_file() and (candidate.name == "tekken.json" or _is_sentencepiece_name(candidate.name)):
            return candidate
    hint = ""
    if (directory / "tokenizer.json").exists():
        hint = " (tokenizer.json, the Hugging Face format, is not supported)"
    raise TokenizerError(
        f"no tokenizer found in directory {directory}: expected tekken.json, tokenizer.model, tokenizer.model.v* "
        f"or another *.model file{hint}"
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a file (`*.json` tekken, `*.model` / `*.model.vN` sentencepiece) or a directory.

    In a directory, tekken.json is preferred, then tokenizer.model, tokenizer.model.* and any other *.model.
    """
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer path does not exist: {path}")
    if path.is_dir():
        path = find_tokenizer_file(path)
    if path.suffix == ".json":
        return TekkenTokenizer(path)
    if _is_sentencepiece_name(path.name):
        return SentencePieceTokenizer(path)
    raise TokenizerError(
        f"unrecognised tokenizer file {path}: expected a tekken .json file or a sentencepiece .model file"
    )


def default_tokenizer() -> SentencePieceTokenizer:
    """The bundled tiny sentencepiece tokenizer (vocab 512), made by `assets/make_tiny_tokenizer.py`."""
    return SentencePieceTokenizer(TINY_SPM_PATH)
