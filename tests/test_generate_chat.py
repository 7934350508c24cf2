"""`python -m infer.generate` chat and batch modes, through the engine.

Reference: `dense_reference.dense_generate` (the single-request loop over the dense latent cache, itself checked
against transformers in test_generate.py) on the same random tiny preset, with prompt ids from mistral-common.
"""

import json
from pathlib import Path

import pytest
from dense_reference import dense_generate as generate
from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from infer.generate import main
from small4_jax.config import Small4Config
from small4_jax.decode import generation
from small4_jax.nn.model import init_model
from small4_jax.inputs.tokenizer import ASSETS_DIR, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
TEKKEN = str(ASSETS_DIR / "tiny_tekken.json")
BASE = ["--config", str(TINY), "--tokenizer", TEKKEN, "--max-model-len", "256", "--prefill-chunk", "32",
        "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def reference():
    model = init_model(Small4Config.from_yaml(TINY), seed=0)
    tok = load_tokenizer(TEKKEN)
    return lambda ids, n=8: generate(model, ids, max_new_tokens=n, stop_ids=[2]), tok


def _last_json(out: str) -> dict:
    return json.loads(out.removesuffix("\n").rsplit("\n", 1)[-1])


def test_chat_with_system_and_reasoning_effort(reference, capsys):
    ref, tok = reference
    assert main(BASE + ["--chat", "--system", "be brief", "--reasoning-effort", "high", "--prompt",
                        "what is the weather?", "--json"]) == 0
    result = _last_json(capsys.readouterr().out)
    request = ChatCompletionRequest(messages=[SystemMessage(content="be brief"),
                                              UserMessage(content="what is the weather?")], reasoning_effort="high")
    ids = tok.mistral_tokenizer().encode_chat_completion(request).tokens
    assert result["token_ids"] == ref(ids)
    assert {"reasoning_content", "tool_calls", "text"} <= set(result)


def test_batch_file_in_order_with_progress(reference, tmp_path, capsys):
    ref, tok = reference
    rows = [
        {"id": "a", "prompt_ids": [1, 200, 300, 400]},
        {"id": "b", "prompt": "hello world", "max_new_tokens": 5},
        {"id": "c", "messages": [{"role": "user", "content": "hi there"}], "reasoning_effort": "none"},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert main(BASE + ["--input", str(src), "--output", str(dst)]) == 0
    err = capsys.readouterr().err
    assert "3/3" in err  # the progress bar
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["id"] for o in out] == ["a", "b", "c"]
    chat_ids = tok.mistral_tokenizer().encode_chat_completion(ChatCompletionRequest(
        messages=[UserMessage(content="hi there")], reasoning_effort="none")).tokens
    assert out[0]["token_ids"] == ref([1, 200, 300, 400])
    assert out[1]["token_ids"] == ref(tok.encode("hello world", bos=True), 5)
    assert out[2]["token_ids"] == ref(chat_ids)
    assert out[0]["text"] == tok.decode(out[0]["token_ids"])
    assert out[2]["finish_reason"] in ("stop", "length") and "reasoning_content" in out[2]


def test_batch_file_errors_name_the_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt_ids": [1, 2]}\n{"prompt_ids": [1, 2]\n')
    assert main(BASE + ["--input", str(src)]) == 2
    assert f"{src}:2: not valid JSON" in capsys.readouterr().err
    src.write_text('{"prompt_ids": [1, 2]}\n{"text": "hi"}\n')
    assert main(BASE + ["--input", str(src)]) == 2
    assert f'{src}:2: each line needs "messages", "prompt" or "prompt_ids"' in capsys.readouterr().err


def test_generate_compiles_nothing_for_a_new_prompt_length():
    """`generation.generate` runs the engine's paged steps at fixed shapes: after one generation, prompts of new
    lengths (within the same page-table width) compile no program (jax's backend-compile events are counted), and
    the greedy output equals the argmax of the model's full forward, token by token."""
    import jax
    import numpy as np

    model = init_model(Small4Config.from_yaml(TINY), seed=0)
    compiles, recording = [], [False]

    def listen(event, *_, **__):
        if recording[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    generation.generate(model, list(range(40, 45)), max_new_tokens=3)  # warm-up
    recording[0] = True
    try:
        outs = {n: generation.generate(model, [1] + list(range(60, 60 + n)), max_new_tokens=3) for n in (6, 33, 70)}
        assert compiles == [], f"{len(compiles)} programs compiled for new prompt lengths"
        generation.generate(model, [20 + i % 400 for i in range(150)], max_new_tokens=3)  # a wider page table (16)
        assert compiles, "no compile event seen: the count above would not see one either"
    finally:
        recording[0] = False
        if hasattr(jax.monitoring, "unregister_event_duration_listener"):
            jax.monitoring.unregister_event_duration_listener(listen)
    prompt, out = [1] + list(range(60, 66)), outs[6]
    seq = list(prompt)
    for t in out:
        assert t == int(np.argmax(np.asarray(model(np.asarray([seq], np.int32)))[0, -1]))
        seq.append(t)
