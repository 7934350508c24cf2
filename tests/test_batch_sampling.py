"""The serving sampler (`small4_jax.decode.sampler`): logit bias, penalties and the token mask vs numpy, and the
token history kept on the device."""

import jax
import numpy as np
import pytest

from small4_jax.decode.sampler import (
    RowSampling, TokenHistory, adjusted_logits, allowed_by_mask, mask_words, sample_rows, sampling_logits, set_slot,
)

V, B = 100, 4


def _numpy_adjusted(logits, bias, counts, prompt, rep, freq, pres, allowed):
    """Independent reference, one row and one token at a time."""
    out = logits.astype(np.float64).copy()
    for b in range(out.shape[0]):
        for tok, val in bias[b].items():
            out[b, tok] += val
        for t in range(out.shape[1]):
            if prompt[b, t] or counts[b, t] > 0:
                out[b, t] = out[b, t] / rep[b] if out[b, t] > 0 else out[b, t] * rep[b]
            out[b, t] -= freq[b] * counts[b, t] + pres[b] * (counts[b, t] > 0)
            if not allowed[b, t]:
                out[b, t] = -np.inf
    return out


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (B, V)).astype(np.float32)
    counts = rng.integers(0, 4, (B, V)) * (rng.random((B, V)) < 0.2)
    prompt = rng.random((B, V)) < 0.1
    bias = [{int(t): float(rng.uniform(-100, 100)) for t in rng.choice(V, 5, replace=False)} for _ in range(B)]
    bias[3] = {}
    allowed = rng.random((B, V)) < 0.7
    allowed[2] = True
    words = np.zeros((B, mask_words(V)), np.uint32)
    for b, t in zip(*np.nonzero(allowed)):
        words[b, t // 32] |= np.uint32(1) << np.uint32(t % 32)
    rep, freq, pres = [1.3, 1.0, 0.7, 2.0], [0.5, -1.0, 0.0, 2.0], [0.25, 1.5, -2.0, 0.0]
    p = RowSampling.from_lists([0.0] * B, [0] * B, [1.0] * B, [0.0] * B, [0] * B, [0] * B, vocab=V, presence=pres,
                               frequency=freq, repetition=rep, logit_bias=bias, mask=words.view(np.int32),
                               slot=[2, 0, 3, 1])
    ref = _numpy_adjusted(logits, bias, counts, prompt, rep, freq, pres, allowed)
    return logits, counts.astype(np.int32), prompt, p, ref, allowed


def test_mask_bits_are_llguidance_layout(rows):
    *_, p, _, allowed = rows
    np.testing.assert_array_equal(np.asarray(allowed_by_mask(p.mask, V)), allowed)


def test_bias_penalties_and_mask_equal_numpy(rows):
    logits, counts, prompt, p, ref, _ = rows
    got = np.asarray(adjusted_logits(logits, p, counts, prompt))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5, atol=1e-4)


def test_sample_rows_uses_the_history_at_each_slot_and_counts_accepted_tokens(rows):
    logits, counts, prompt, p, ref, _ = rows
    slots = np.asarray(p.slot)
    history = TokenHistory.create(5, V)
    for b in range(B):
        history = set_slot(history, np.int32(slots[b]), counts[b], prompt[b])
    p.accept = np.asarray([1, 1, 0, 1], np.int32)
    tokens, chosen, _, _, new = sample_rows(logits, p, history, 3)
    np.testing.assert_array_equal(np.asarray(tokens), ref.argmax(-1))  # greedy = argmax of the processed logits
    logprobs = jax.nn.log_softmax(logits, -1)  # logprobs are the model's (raw logits)
    np.testing.assert_allclose(np.asarray(chosen), np.asarray(logprobs)[np.arange(B), ref.argmax(-1)], rtol=1e-5)
    expect = np.zeros((5, V), np.int32)
    expect[slots] = counts
    for b in range(B):
        expect[slots[b], ref[b].argmax()] += p.accept[b]
    np.testing.assert_array_equal(np.asarray(new.counts), expect)


def test_sampled_rows_draw_from_the_processed_distribution(rows):
    logits, counts, prompt, p, ref, _ = rows
    p.temperature = np.asarray([0.7, 1.0, 1.3, 0.5], np.float32)
    p.top_p = np.asarray([1.0, 0.9, 1.0, 1.0], np.float32)
    want = np.asarray(jax.nn.softmax(sampling_logits(logits, p, counts, prompt), -1))
    history = TokenHistory.create(5, V)
    for b in range(B):
        history = set_slot(history, np.int32(p.slot[b]), counts[b], prompt[b])
    draw = jax.jit(jax.vmap(lambda c: sample_rows(logits, RowSampling(**{**p.__dict__, "counter": c}), history, 1)[0]))
    n = 4000
    got = np.asarray(draw(np.repeat(np.arange(n, dtype=np.int32)[:, None], B, 1)))
    for b in range(B):
        freq = np.bincount(got[:, b], minlength=V) / n
        assert freq[want[b] == 0].sum() == 0  # masked, filtered and top-p-cut tokens never drawn
        assert np.abs(freq - want[b]).max() < 0.04, b


def test_single_request_sampler_is_the_serving_filter():
    """`sampling.sample` (generation.generate) draws from `filtered_logits`: within top-k and the top-p nucleus
    (numpy), at their probabilities."""
    from small4_jax.decode.sampling import sample

    logits = np.asarray(jax.random.normal(jax.random.key(0), (2, 50)) * 3, np.float32)
    draw = jax.jit(jax.vmap(lambda k: sample(logits, k, 0.8, 6, 0.7, greedy=False)))
    got = np.asarray(draw(jax.random.split(jax.random.key(1), 4000)))
    for b in range(2):
        z = logits[b] / 0.8
        order = np.argsort(-z)[:6]
        p = np.exp(z[order] - z[order].max())
        p /= p.sum()
        keep = order[(np.cumsum(p) - p) < 0.7]
        want = np.zeros(50)
        want[keep] = np.exp(z[keep] - z[keep].max()) / np.exp(z[keep] - z[keep].max()).sum()
        freq = np.bincount(got[:, b], minlength=50) / len(got)
        assert set(np.nonzero(freq)[0]) <= set(keep) and np.abs(freq - want).max() < 0.04
    np.testing.assert_array_equal(sample(logits, jax.random.key(0), 1.0, 0, 1.0, greedy=True), logits.argmax(-1))
