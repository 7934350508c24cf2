"""Build the bundled tiny sentencepiece tokenizer, `tiny_spm.model`, used by the tiny test model and the examples.

Run from anywhere:

    python small4_jax/assets/make_tiny_tokenizer.py [OUTPUT_PATH]

The model is trained in-process on text generated here from fixed word lists, so it needs no files and no
network, and the same sentencepiece version always writes the same bytes (one thread, no input shuffling).

Layout (vocab_size is exactly 512, matching the tiny model config):

    0         <unk>   (unknown; never produced by encoding, since byte_fallback is on)
    1         <s>     (BOS, control)
    2         </s>    (EOS, control)
    3 .. 14   control symbols, in the order of CONTROL_SYMBOLS below: [INST]=3, [/INST]=4, [TOOL_CALLS]=5,
              [AVAILABLE_TOOLS]=6, [/AVAILABLE_TOOLS]=7, [TOOL_RESULTS]=8, [/TOOL_RESULTS]=9,
              [SYSTEM_PROMPT]=10, [/SYSTEM_PROMPT]=11, [ARGS]=12, [THINK]=13, [/THINK]=14
    15 .. 270 byte-fallback pieces <0x00> .. <0xFF>
    271 ..511 learnt BPE pieces and characters

There is no pad token (pad_id = -1), as in Mistral's own sentencepiece tokenizers; code that batches must pick
its own padding id (and mask it). Like Mistral's models, the specials are *control* symbols: plain encoding never
produces them from text (the string "[INST]" in user text is split as ordinary text) and sentencepiece's decoder
drops them; `SentencePieceTokenizer` maps them when asked (`allow_special=True`, `skip_special=False`).
Normalisation mirrors Mistral's models too: identity rules, a dummy prefix space, whitespace kept as is, digits
split one by one.
"""

import io
import sys
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 512
OUTPUT = Path(__file__).resolve().parent / "tiny_spm.model"

CONTROL_SYMBOLS = [
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[ARGS]",
    "[THINK]",
    "[/THINK]",
]

_SUBJECTS = [
    "the model", "a small cat", "the old man", "my friend", "the teacher", "our team", "the weather", "a young girl",
    "the computer", "this answer", "the user", "the assistant", "every student", "the city", "a quiet river",
    "the little robot", "her brother", "the system", "the tokenizer", "the garden",
]
_VERBS = [
    "reads", "writes", "sees", "finds", "likes", "knows", "makes", "takes", "gives", "thinks about", "wants",
    "needs", "explains", "answers", "remembers", "opens", "closes", "follows", "builds", "describes",
]
_OBJECTS = [
    "a long book", "the question", "some water", "a new idea", "the red door", "three apples", "the next step",
    "a short story", "the weather report", "the main street", "a simple function", "the final answer",
    "an old letter", "the small window", "a good reason", "the morning train", "its own name", "the big table",
    "a warm coffee", "the first line",
]
_ENDINGS = [
    "today", "every morning", "in the evening", "before lunch", "after the rain", "with great care", "very slowly",
    "at home", "in the park", "again and again", "without a word", "for a while", "by the river", "on Monday",
    "in 2024", "at 9:30", "for 15 minutes", "near the station", "all day", "once more",
]
_QUESTIONS = [
    "What is the capital of France?", "How are you today?", "Can you help me with this?", "Why is the sky blue?",
    "Where did you put the keys?", "Who wrote this letter?", "When does the train leave?",
    "Could you explain the answer?", "Is it going to rain tomorrow?", "What time is it?", "Hello, who are you?",
    "Hello, world!",
]
_ANSWERS = [
    "The capital of France is Paris.", "I am fine, thank you!", "Sure, I can help you with that.",
    "Because of the way light is scattered.", "They are on the kitchen table.", "My friend wrote it last year.",
    "The train leaves at 7:15.", "Let me think about it step by step.", "Yes, it will probably rain.",
    "It is half past ten.", "Hello! I am a helpful assistant.", "Hello, world! How can I help you?",
]
# A little non-ASCII text, so that common accented letters get their own pieces; rarer scripts and emoji are
# left to byte fallback.
_EXTRA = [
    "Le café est très bon.", "Ich möchte über die Straße gehen.", "El señor dice: ¡hasta mañana!",
    "Das Mädchen ist schön.", "C'est déjà fini, à bientôt.", "São Paulo é uma cidade grande.",
    "It was a naïve idea.", "Die Größe ist 3×4 Meter.",
]
_CODE = [
    "def add(a, b):", "    return a + b", "for i in range(10):", "    print(i)", "x = [1, 2, 3]",
    'data = {"name": "value", "count": 42}', "if x > 0 and y < 5:", "result = func(arg1, arg2)",
]


def _lcg(seed: int):
    """Endless stream of pseudo-random ints from a fixed linear congruential generator (same on every Python)."""
    state = seed
    while True:
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        yield state >> 33


def training_sentences() -> list[str]:
    """The fixed training text: about a thousand short lines of simple English, Q&A, a little code and Europe."""
    rnd = _lcg(12345)
    lines = []
    for _ in range(800):
        s, v, o, e = (next(rnd) for _ in range(4))
        sentence = f"{_SUBJECTS[s % len(_SUBJECTS)]} {_VERBS[v % len(_VERBS)]} {_OBJECTS[o % len(_OBJECTS)]}"
        sentence = f"{sentence} {_ENDINGS[e % len(_ENDINGS)]}."
        lines.append(sentence[0].upper() + sentence[1:])
    for i, q in enumerate(_QUESTIONS):
        lines.extend([q, _ANSWERS[i]] * 5)
    lines.extend(_EXTRA * 5)
    lines.extend(_CODE * 5)
    return lines


def build_model_bytes() -> bytes:
    """Train the tiny BPE model in memory and return the serialized `.model` file."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_sentences()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        control_symbols=CONTROL_SYMBOLS,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buf.getvalue()


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else OUTPUT
    data = build_model_bytes()
    sp = spm.SentencePieceProcessor(model_proto=data)
    assert sp.vocab_size() == VOCAB_SIZE, sp.vocab_size()
    assert [sp.piece_to_id(p) for p in CONTROL_SYMBOLS] == list(range(3, 3 + len(CONTROL_SYMBOLS)))
    out.write_bytes(data)
    print(f"wrote {out} ({len(data)} bytes, vocab {sp.vocab_size()})")


if __name__ == "__main__":
    main(sys.argv)
