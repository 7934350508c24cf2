"""train.data: chat encoding and loss masks (tekken against mistral-common, sentencepiece layout), packing, batches."""

import numpy as np
import pytest

from small4_jax.inputs.tokenizer import TekkenTokenizer, default_tokenizer
from test_tokenizer import V13_SPECIALS, write_tekken
from train.data import batch_indices, encode_row, pack, validate_row

TOOLS = [{"type": "function", "function": {"name": "weather", "description": "w",
                                           "parameters": {"type": "object", "properties": {}}}}]
ROW = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the answer", "weight": 0},
        {"role": "user", "content": "the weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "abcDEF123", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "nice"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "nice"}]},
    ],
    "tools": TOOLS,
}


@pytest.fixture(scope="module")
def tekken(tmp_path_factory):
    return TekkenTokenizer(write_tekken(tmp_path_factory.mktemp("tk") / "tekken.json", V13_SPECIALS, 32, "v13"))


def test_tekken_ids_equal_mistral_common_and_mask_covers_trained_assistant_turns(tekken):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    assert validate_row(ROW) is None
    ids, mask = encode_row(ROW, tekken)
    msgs = [{k: v for k, v in m.items() if k != "weight"} for m in ROW["messages"]]
    reference = MistralTokenizer.from_file(str(tekken.path), mode=ValidationMode.finetuning)
    ref = reference.encode_chat_completion(ChatCompletionRequest.from_openai(msgs, tools=TOOLS))
    assert ids == list(ref.tokens)
    trained = tekken.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    # the weight-0 answer is not trained; the tool call, the reasoning and both closing </s> are
    assert "the answer" not in trained
    assert trained == "[TOOL_CALLS]weather[ARGS]{}</s>[THINK]hmm[/THINK]nice</s>"


def test_sentencepiece_layout_and_mask():
    tok = default_tokenizer()
    ids, mask = encode_row(ROW, tok)
    text = tok.decode(ids, skip_special=False)
    assert text.startswith("<s>[SYSTEM_PROMPT]be brief[/SYSTEM_PROMPT][AVAILABLE_TOOLS]")
    assert "[INST]hello world[/INST]the answer</s>[INST]the weather?[/INST][TOOL_CALLS]weather[ARGS]{}</s>" in text
    assert text.endswith("[TOOL_RESULTS]nice[/TOOL_RESULTS][THINK]hmm[/THINK]nice</s>")
    trained = tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    assert trained == "[TOOL_CALLS]weather[ARGS]{}</s>[THINK]hmm[/THINK]nice</s>"
    text_ids, text_mask = encode_row({"text": "the model reads"}, tok)
    assert text_ids[0] == tok.bos_id and text_ids[-1] == tok.eos_id and text_mask == [False] + [True] * (len(text_ids) - 1)


def test_packing_segments_positions_and_targets():
    docs = [([1, 10, 11, 12], [False, False, True, True]), ([1, 20, 21], [False, True, True]),
            ([1] + list(range(30, 40)), [False] + [True] * 10)]
    packed, truncated = pack(docs, seq_len=6, pad_id=0)
    assert truncated == 1 and len(packed) == 2
    np.testing.assert_array_equal(packed.inputs[0], [1, 10, 11, 1, 20, 0])
    np.testing.assert_array_equal(packed.targets[0], [10, 11, 12, 20, 21, 0])
    np.testing.assert_array_equal(packed.weights[0], [0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(packed.segments[0], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(packed.positions[0], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(packed.segments[1], [1] * 6)  # the long document, cut to one row


def test_batches_are_deterministic_epoch_permutations():
    a = [batch_indices(10, 4, s, seed=3) for s in range(5)]
    b = [batch_indices(10, 4, s, seed=3) for s in range(5)]
    assert all((x == y).all() for x, y in zip(a, b))
    flat = np.concatenate(a)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # each epoch covers all
    assert not (np.concatenate([batch_indices(10, 4, s, seed=4) for s in range(5)]) == flat).all()
