"""Per-row sampling: penalties against hand computations, truncation, seeds and batch isolation."""

from __future__ import annotations

import math

import pytest
import torch

from sae_runtime.backends.completion import RowText
from sae_runtime.backends.sampling import (
    SlotSampler,
    apply_frequency_penalty,
    apply_repetition_penalty,
    new_generator,
    sample_inverse_cdf,
    truncate_top_k,
    truncate_top_p,
)
from sae_runtime.backends.types import SamplingParams

VOCAB = 12


def _sampler(params, prompts=None, seeds=None):
    seeds = seeds or [p.seed for p in params]
    gens = [new_generator(s)[0] for s in seeds]
    sampler = SlotSampler(len(params), VOCAB)
    for slot, (p, g, ids) in enumerate(zip(params, gens, prompts or [[] for _ in params])):
        sampler.assign(slot, p, g, ids)
    return sampler


def test_repetition_penalty_matches_hand_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [1.0, 1.0, -2.0, 0.0]])
    seen = torch.tensor([[True, True, False, False], [False, True, True, True]])
    penalty = torch.tensor([2.0, 1.5])
    out = apply_repetition_penalty(logits, seen, penalty)
    for r in range(2):
        for v in range(4):
            x, p = logits[r, v].item(), penalty[r].item()
            want = (x * p if x < 0 else x / p) if seen[r, v] else x
            assert out[r, v].item() == pytest.approx(want)


def test_frequency_penalty_matches_hand_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    counts = torch.tensor([[3, 0, 1]])
    out = apply_frequency_penalty(logits, counts, torch.tensor([0.5]))
    assert out[0].tolist() == pytest.approx([2.0 - 1.5, -1.0, 0.5 - 0.5])


def test_sampler_applies_repetition_penalty_to_prompt_and_generated_tokens():
    params = [SamplingParams(temperature=0.0, repetition_penalty=3.0)]
    s = _sampler(params, prompts=[[4]])
    logits = torch.zeros(1, VOCAB)
    logits[0, 4], logits[0, 7], logits[0, 2] = 5.0, 4.0, 1.7
    # step 1: token 4 (prompt) is penalised 5 -> 5/3, so 7 wins
    assert s.step(logits).tokens.item() == 7
    # step 2: 7 is now seen too (4/3 = 1.33 and 5/3 = 1.67 < 1.7), 2 wins
    assert s.step(logits).tokens.item() == 2


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0]])
    out = truncate_top_k(logits, torch.tensor([2, 0]))
    assert torch.isfinite(out[0]).tolist() == [False, True, False, True, False]
    assert torch.equal(out[1], logits[1])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    # sorted: 0.5, 0.3, 0.15, 0.05 -> cumulative 0.5, 0.8, 0.95: p=0.8 keeps {0, 2}, p=0.81 adds 3
    assert torch.isfinite(truncate_top_p(logits, torch.tensor([0.8]))).tolist() == [[True, False, True, False]]
    assert torch.isfinite(truncate_top_p(logits, torch.tensor([0.81]))).tolist() == [[True, False, True, True]]
    assert torch.isfinite(truncate_top_p(logits, torch.tensor([0.01]))).tolist() == [[True, False, False, False]]
    assert torch.isfinite(truncate_top_p(logits, torch.tensor([1.0]))).all()


def test_inverse_cdf_draws_follow_the_distribution_and_skip_removed_tokens():
    logits = torch.tensor([0.0, 1.0, -math.inf, 2.0]).log_softmax(0).expand(20000, 4).contiguous()
    g = torch.Generator().manual_seed(0)
    tokens = sample_inverse_cdf(logits, torch.rand(20000, generator=g))
    freq = torch.bincount(tokens, minlength=4).float() / 20000
    want = torch.tensor([0.0, 1.0, -math.inf, 2.0]).softmax(0)
    assert freq[2] == 0
    assert torch.allclose(freq, want, atol=0.015)
    # the extremes of [0, 1) land on the first and last tokens with probability
    edge = sample_inverse_cdf(logits[:2], torch.tensor([0.0, 0.999999]))
    assert edge.tolist() == [0, 3]


def _run(sampler, logits_seq):
    return [sampler.step(l).tokens.tolist() for l in logits_seq]


def _random_logits(steps, rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, VOCAB, generator=g) for _ in range(steps)]


def test_same_seed_same_tokens_and_different_seed_differs():
    p = SamplingParams(temperature=1.0, seed=7)
    logits = _random_logits(30, 1)
    a = _run(_sampler([p]), logits)
    b = _run(_sampler([p]), logits)
    c = _run(_sampler([SamplingParams(temperature=1.0, seed=8)]), logits)
    assert a == b
    assert a != c


def test_top_k_one_equals_greedy():
    logits = _random_logits(10, 1)
    greedy = _run(_sampler([SamplingParams(temperature=0.0)]), logits)
    top1 = _run(_sampler([SamplingParams(temperature=1.3, top_k=1, seed=3)]), logits)
    assert greedy == top1
    assert greedy == [[int(l.argmax())] for l in logits]


def test_rows_are_isolated_from_their_batch_neighbours():
    params = [
        SamplingParams(temperature=0.9, top_p=0.8, seed=11),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.5, top_k=4, frequency_penalty=0.5, seed=12),
        SamplingParams(temperature=0.7, repetition_penalty=1.3, seed=11),
    ]
    logits = _random_logits(25, 4, seed=5)
    batch = _run(_sampler(params, prompts=[[1], [2], [3], [1, 5]]), logits)
    for r, p in enumerate(params):
        solo = _run(_sampler([p], prompts=[[[1], [2], [3], [1, 5]][r]]), [l[r : r + 1] for l in logits])
        assert [step[r] for step in batch] == [s[0] for s in solo]


def test_rows_leaving_the_forward_draw_nothing():
    p = SamplingParams(temperature=1.0, seed=5)
    logits = _random_logits(6, 2)
    s = _sampler([p, p])
    # slot 1 leaves the forward after 2 steps; slot 0 continues exactly as a solo run
    out = [s.step(l if i < 2 else l[:1], slots=[0, 1] if i < 2 else [0]).tokens.tolist() for i, l in enumerate(logits)]
    assert [o[0] for o in out] == [o[0] for o in _run(_sampler([p]), [l[:1] for l in logits])]
    # and slot 1, back in a later forward, continues its own draws where it paused
    again = SlotSampler(1, VOCAB)
    again.assign(0, p, new_generator(5)[0], [])
    solo = _run(again, [l[1:2] for l in logits[:3]])
    assert s.step(logits[2][1:2], slots=[1]).tokens.tolist() == solo[2]


def test_reported_logprobs_are_log_softmax_of_penalised_tempered_logits():
    p = SamplingParams(temperature=0.5, top_k=2, repetition_penalty=2.0, frequency_penalty=0.3, seed=0)
    logits = _random_logits(3, 1, seed=9)
    s = _sampler([p], prompts=[[0, 1]])
    seen, counts = {0, 1}, [0] * VOCAB
    for l in logits:
        out = s.step(l)
        hand = []
        for v in range(VOCAB):
            x = l[0, v].item()
            if v in seen:
                x = x * 2.0 if x < 0 else x / 2.0
            x -= 0.3 * counts[v]
            hand.append(x / 0.5)
        want = torch.tensor(hand).log_softmax(0)
        assert torch.allclose(out.logprobs[0], want, atol=1e-5)
        t = out.tokens.item()
        seen.add(t)
        counts[t] += 1


class _CharTokenizer:
    """Decodes ids as letters (id 0 = 'a'), id 99 is a special token dropped by decode."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids if i != 99)


def test_row_text_stops_on_stop_string_eos_and_length():
    tok = _CharTokenizer()
    row = RowText(tok, stop=("cd",), max_new_tokens=10, eos_ids=frozenset({99}))
    for i in (0, 1, 2, 3, 4):
        if row.done:
            break
        row.push(i)
    assert (row.text, row.finish_reason, len(row.records)) == ("ab", "stop", 4)
    assert "".join(r.text for r in row.records) == "abcd"

    row = RowText(tok, stop=(), max_new_tokens=10, eos_ids=frozenset({99}))
    row.push(0)
    assert row.push(99) is None
    assert (row.text, row.finish_reason) == ("a", "eos")

    row = RowText(tok, stop=("zz",), max_new_tokens=2, eos_ids=frozenset())
    row.push(0), row.push(1)
    assert (row.text, row.finish_reason) == ("ab", "length")


@pytest.mark.parametrize("byte_level", [False, True])
def test_id_decoder_equals_the_tokenizers_decode(byte_level):
    from sae_runtime.backends.completion import id_decoder
    from sae_runtime.demo.tiny_models import build_tiny_tokenizer

    tok = build_tiny_tokenizer(byte_level=byte_level)
    decode = id_decoder(tok)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, len(tok), (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        assert decode(ids) == tok.decode(ids, skip_special_tokens=True)
    # A tokenizer that cleans up spaces keeps transformers' decode (the clean-up is part of it).
    tok.clean_up_tokenization_spaces = True
    ids = tok("a b")["input_ids"]
    assert id_decoder(tok)(ids) == tok.decode(ids, skip_special_tokens=True)
