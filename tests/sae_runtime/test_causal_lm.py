"""CausalLmBackend on a tiny Llama saved with save_pretrained and reloaded through from_pretrained.

Independent second paths: HF ``generate`` for unsteered greedy decoding, a full no-cache
recomputation with a hand-written hook for steered decoding, solo runs for batch isolation, hand
formulas for penalties and log-probs, hand pooling for risk scores.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sae_runtime.backends.causal_lm import CausalLmBackend
from sae_runtime.backends.spec import Limits, ModelSpec, SaeSpec
from sae_runtime.backends.types import ChatMessage, EncodeRequest, SamplingParams, TextRequest, Timings
from sae_runtime.demo.tiny_models import build_tiny_causal_lm
from sae_runtime.errors import FormatError, InvalidArgument, NotFound, TooLarge
from sae_runtime.formats import save_native
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit, ReadoutSpec, Scope, TokenScope
from sae_runtime.risk import PooledStats, ProbeLayout, RiskProbe
from sae_runtime.saes import SaeConfig, build_sae

D_MODEL, D_SAE = 32, 64
PROMPTS = ("the cat is red and the dog", "a bird", "where is the big house")


def _random_sae(architecture: str, hook: str, seed: int):
    torch.manual_seed(seed)
    sae = build_sae(SaeConfig(architecture, D_MODEL, D_SAE, hook_name=hook))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0.0, 0.3)
        if architecture == "jumprelu":
            sae.threshold.fill_(0.2)
    sae.labels = {"red": 3, "blue": 5}
    return sae


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> CausalLmBackend:
    root = tmp_path_factory.mktemp("causal_lm")
    model_dir = build_tiny_causal_lm(root / "llama", "llama", seed=0, init_std=0.2)
    save_native(_random_sae("standard", "blocks.0.hook_resid_post", 1), root / "s0")
    save_native(_random_sae("jumprelu", "blocks.1.hook_resid_pre", 2), root / "s1")
    g = torch.Generator().manual_seed(3)
    n = 4 * D_SAE
    probe = RiskProbe(
        layout=ProbeLayout((("s0", D_SAE),)),
        feature_mean=torch.rand(n, generator=g), feature_std=torch.rand(n, generator=g) + 0.5,
        prompt_coef=torch.randn(n // 2, generator=g) * 0.2, prompt_intercept=-0.3,
        final_coef=torch.randn(n, generator=g) * 0.2, final_intercept=0.1,
    )
    probe.save(root / "probe")
    spec = ModelSpec(
        name="tiny", kind="causal_lm", path=str(model_dir),
        saes=(SaeSpec("s0", str(root / "s0")), SaeSpec("s1", str(root / "s1"))),
        risk_probe=str(root / "probe"), limits=Limits(max_prompt_tokens=32, max_new_tokens=32, max_edits=8),
    )
    return CausalLmBackend.from_spec(spec)


def _ids(completion) -> list[int]:
    return [t.id for t in completion.tokens]


def _no_timings(result):
    return dataclasses.replace(result, timings=Timings())


def assert_close(a, b, path="result"):
    """Equal results, except floats may differ by batched-vs-solo rounding (1e-4); timings ignored."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), path
        for f in dataclasses.fields(a):
            if f.name != "timings":
                assert_close(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-4), path
    else:
        assert a == b, path


def _steer_plan(scope: TokenScope = TokenScope.ALL) -> InterventionPlan:
    return InterventionPlan((LatentEdit("s0", EditOp.SET, (3, 7), 6.0), LatentEdit("s1", EditOp.SCALE, (1, 2, 4), 3.0)), Scope(tokens=scope))


# -- loading and info ------------------------------------------------------------------------------
def test_info_lists_saes_and_probe(backend):
    info = backend.info()
    assert info.kind == "causal_lm" and info.has_risk_probe
    assert [(s.name, s.hook_name, s.architecture, s.d_sae, s.has_labels) for s in info.saes] == [
        ("s0", "blocks.0.hook_resid_post", "standard", D_SAE, True),
        ("s1", "blocks.1.hook_resid_pre", "jumprelu", D_SAE, True),
    ]


def test_from_spec_with_a_missing_directory_is_a_format_error(tmp_path):
    with pytest.raises(FormatError) as err:
        CausalLmBackend.from_spec(ModelSpec(name="x", kind="causal_lm", path=str(tmp_path / "absent")))
    assert err.value.field == str(tmp_path / "absent")


# -- unsteered greedy equals HF generate -------------------------------------------------------------
def _hf_greedy(backend, prompts, n):
    tok = backend.tokenizer
    batch = tok(list(prompts), return_tensors="pt", padding=True)  # the tiny tokenizer pads on the left
    out = backend.model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=backend.pad_id)
    rows = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        ids = []
        for t in row:
            ids.append(t)
            if t in backend.eos_ids:
                break
        rows.append(ids)
    return rows


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["solo", "padded-batch"])
def test_greedy_with_empty_plan_equals_hf_generate(backend, prompts):
    n = 10
    want = _hf_greedy(backend, prompts, n)
    reqs = [TextRequest(prompt=p, sampling=SamplingParams(max_new_tokens=n)) for p in prompts]
    # reading latents attaches hooks but must not change anything
    reqs[0] = dataclasses.replace(reqs[0], readout=ReadoutSpec(("s0", "s1"), 3))
    results = backend.generate(reqs)
    for got, hf in zip(results, want):
        ids = _ids(got.steered) + ([hf[-1]] if got.steered.finish_reason == "eos" else [])
        assert ids == hf
        assert len(set(ids)) > 1


# -- steered decoding with the cache equals a no-cache recomputation ----------------------------------
def _recompute_steered(backend, prompt, plan, n):
    """Greedy decoding re-running the full sequence each step, edits applied by a hand-written hook:
    x + sum_i (f'_i - f_i) W_dec[i] at the positions the scope names (prompt = the first L)."""
    model, saes = backend.model, backend.saes
    ids = backend.tokenizer(prompt)["input_ids"]
    n_prompt = len(ids)
    layers = model.model.layers
    scope = plan.scope.tokens

    def in_scope(t):
        pos = torch.arange(t)
        if scope is TokenScope.PROMPT:
            return pos < n_prompt
        if scope is TokenScope.GENERATED:
            return pos >= n_prompt
        return torch.ones(t, dtype=torch.bool)

    def edited(x, edit):
        sae = saes[edit.sae]
        f = sae.encode(x)
        delta = torch.zeros_like(x)
        for i in edit.latents:
            new = edit.value if edit.op is EditOp.SET else f[..., i] * edit.value
            delta = delta + (new - f[..., i]).unsqueeze(-1) * sae.W_dec[i]
        return x + delta * in_scope(x.shape[1]).unsqueeze(-1)

    by_name = {e.sae: e for e in plan.edits}

    def post_hook(module, args, output):
        return (edited(output[0], by_name["s0"]), *output[1:]) if isinstance(output, tuple) else edited(output, by_name["s0"])

    def pre_hook(module, args, kwargs):
        if args:
            return (edited(args[0], by_name["s1"]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edited(kwargs["hidden_states"], by_name["s1"])}

    handles = [layers[0].register_forward_hook(post_hook), layers[1].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    tokens, logprobs = [], []
    try:
        with torch.no_grad():
            seq = list(ids)
            for _ in range(n):
                logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                nxt = int(logits.argmax())
                if nxt in backend.eos_ids:
                    break
                tokens.append(nxt)
                logprobs.append(float(logits.log_softmax(-1)[nxt]))
                seq.append(nxt)
    finally:
        for h in handles:
            h.remove()
    return tokens, logprobs


@pytest.mark.parametrize("scope", list(TokenScope))
def test_steered_kv_cache_decoding_equals_no_cache_recomputation(backend, scope):
    n = 8
    plan = _steer_plan(scope)
    [res] = backend.generate([TextRequest(prompt=PROMPTS[0], plan=plan, sampling=SamplingParams(max_new_tokens=n), logprobs=1, include_default=True)])
    want_ids, want_lp = _recompute_steered(backend, PROMPTS[0], plan, n)
    assert _ids(res.steered) == want_ids
    assert [t.logprob for t in res.steered.tokens] == pytest.approx(want_lp, abs=1e-4)
    assert _ids(res.steered) != _ids(res.default)  # the edit matters for this model
    assert res.timings.compute_ms > 0
    if scope is TokenScope.GENERATED:  # edits at decode positions cannot change the first token
        assert res.steered.tokens[0].id == res.default.tokens[0].id


# -- batch isolation ---------------------------------------------------------------------------------
def test_batched_equals_solo_for_different_plans_and_seeds(backend):
    reqs = [
        TextRequest(prompt=PROMPTS[0], plan=_steer_plan(), sampling=SamplingParams(max_new_tokens=8, temperature=0.9, seed=1), include_default=True, logprobs=2),
        TextRequest(prompt=PROMPTS[1], sampling=SamplingParams(max_new_tokens=5)),
        TextRequest(prompt=PROMPTS[2], plan=InterventionPlan((LatentEdit("s0", EditOp.ADD, (5,), 4.0),), Scope(tokens=TokenScope.PROMPT)),
                    sampling=SamplingParams(max_new_tokens=8, temperature=1.3, top_p=0.9, top_k=20, repetition_penalty=1.2, seed=2),
                    readout=ReadoutSpec(("s1",), 2)),
        TextRequest(prompt=PROMPTS[0], plan=_steer_plan(), sampling=SamplingParams(max_new_tokens=6, temperature=0.9, frequency_penalty=0.5, seed=9)),
    ]
    batched = backend.generate(reqs)
    for req, got in zip(reqs, batched):
        [solo] = backend.generate([req])
        assert_close(got, solo)
    # the default twin is an unsteered call with the same seed, run in the same batch
    [alone] = backend.generate([dataclasses.replace(reqs[0], plan=InterventionPlan(), include_default=False)])
    assert _ids(batched[0].default) == _ids(alone.steered)
    assert _ids(batched[0].default) != _ids(batched[0].steered)
    assert _ids(batched[0].steered) != _ids(batched[3].steered)  # different seeds, same plan
    # more requests than the batch limit run as several passes, with the same results
    small = CausalLmBackend(backend.model, backend.tokenizer, backend.saes, risk_probe=backend.risk_probe,
                            limits=dataclasses.replace(backend.limits, max_batch_size=3))
    assert_close(small.generate(reqs), batched)


# -- sampling ----------------------------------------------------------------------------------------
def test_same_seed_same_tokens_and_top_k_one_is_greedy(backend):
    sampled = SamplingParams(max_new_tokens=10, temperature=1.5, seed=5)
    [a, b] = backend.generate([TextRequest(prompt=PROMPTS[2], sampling=sampled)] * 2)
    [c] = backend.generate([TextRequest(prompt=PROMPTS[2], sampling=dataclasses.replace(sampled, seed=6))])
    assert _ids(a.steered) == _ids(b.steered) != _ids(c.steered)
    [greedy, top1] = backend.generate([
        TextRequest(prompt=PROMPTS[2], sampling=SamplingParams(max_new_tokens=10)),
        TextRequest(prompt=PROMPTS[2], sampling=SamplingParams(max_new_tokens=10, temperature=1.5, top_k=1, seed=5)),
    ])
    assert _ids(greedy.steered) == _ids(top1.steered)


def test_logprobs_are_log_softmax_of_penalised_tempered_logits(backend):
    """Hand computation: HF repetition penalty over prompt + generated ids, OpenAI frequency penalty
    over generated ids, divide by temperature, log_softmax (no top-k/top-p truncation)."""
    rep, freq, temp, n = 1.7, 0.4, 0.8, 4
    req = TextRequest(prompt=PROMPTS[0], logprobs=3, sampling=SamplingParams(
        max_new_tokens=n, temperature=temp, top_k=5, repetition_penalty=rep, frequency_penalty=freq, seed=4))
    [res] = backend.generate([req])
    seq = backend.tokenizer(PROMPTS[0])["input_ids"]
    generated: list[int] = []
    with torch.no_grad():
        for tok in res.steered.tokens:
            logits = backend.model(input_ids=torch.tensor([seq + generated])).logits[0, -1].tolist()
            hand = []
            for v, x in enumerate(logits):
                if v in seq or v in generated:
                    x = x * rep if x < 0 else x / rep
                x -= freq * generated.count(v)
                hand.append(x / temp)
            lp = torch.tensor(hand).log_softmax(0)
            assert tok.logprob == pytest.approx(float(lp[tok.id]), abs=1e-4)
            top = lp.topk(3)
            assert [v for _, v in tok.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert [t for t, _ in tok.top_logprobs] == [backend.tokenizer.decode([i]) for i in top.indices.tolist()]
            assert tok.id in lp.topk(5).indices.tolist()  # drawn from the top-k set
            generated.append(tok.id)


# -- streaming, stop strings, chat -------------------------------------------------------------------
def test_stream_equals_generate(backend):
    req = TextRequest(prompt=PROMPTS[0], plan=_steer_plan(), readout=ReadoutSpec(("s0",), 3), logprobs=2, include_default=True,
                      sampling=SamplingParams(max_new_tokens=7, temperature=1.1, seed=3))
    [want] = backend.generate([req])
    events = list(backend.stream(req))
    final = events[-1]
    assert final.token is None and final.result is not None
    assert _no_timings(final.result) == _no_timings(want)
    assert tuple(e.token for e in events[:-1]) == want.steered.tokens
    assert all(e.token.latents for e in events[:-1])
    assert events[-2].risk == pytest.approx(want.risk_final.probability)


def test_engine_mixes_streamed_and_unary_requests_in_its_steps(backend):
    reqs = [
        TextRequest(prompt=PROMPTS[0], plan=_steer_plan(), include_default=True, sampling=SamplingParams(max_new_tokens=6, temperature=1.0, seed=1)),
        TextRequest(prompt=PROMPTS[1], sampling=SamplingParams(max_new_tokens=4)),
        TextRequest(prompt=PROMPTS[2], plan=_steer_plan(), readout=ReadoutSpec(("s0",), 2), sampling=SamplingParams(max_new_tokens=5)),
    ]
    solo = [backend.generate([r])[0] for r in reqs]  # the independent path: each request alone
    events: dict[int, list] = {0: [], 1: [], 2: []}
    runs = [backend.engine.submit(backend.validate(r), events[i].append, stream=i != 1) for i, r in enumerate(reqs)]
    widths = []
    while not all(r.done.is_set() for r in runs):
        widths.append(backend.engine.step().running_rows)
    assert max(widths) == 4  # the three requests (and one twin) ran in the same steps
    for i in range(3):
        final = events[i][-1]
        assert final.token is None and final.error is None
        assert_close(final.result, solo[i])  # batched vs solo: floats to 1e-4
    tokens = {i: tuple(e.token for e in events[i] if e.token is not None) for i in range(3)}
    assert_close(tokens[0], solo[0].steered.tokens)
    assert_close(tokens[2], solo[2].steered.tokens)
    assert tokens[1] == ()  # not streamed: its final event only
    last_risk = [e.risk for e in events[2] if e.token is not None][-1]
    assert last_risk == pytest.approx(solo[2].risk_final.probability, abs=1e-4)


def test_stream_resumed_on_other_threads_matches_and_leaks_no_grad_mode(backend):
    """The service calls next() on the stream from a thread pool: each step may run elsewhere."""
    from concurrent.futures import ThreadPoolExecutor

    req = TextRequest(prompt=PROMPTS[1], plan=_steer_plan(), sampling=SamplingParams(max_new_tokens=5, temperature=1.0, seed=8))
    [want] = backend.generate([req])
    events, done = backend.stream(req), object()
    got = []
    pools = [ThreadPoolExecutor(1), ThreadPoolExecutor(1)]
    try:
        for i in range(100):
            event = pools[i % 2].submit(next, events, done).result()
            if event is done:
                break
            got.append(event)
        grad_modes = [p.submit(torch.is_grad_enabled).result() for p in pools]
    finally:
        for p in pools:
            p.shutdown()
    assert _no_timings(got[-1].result) == _no_timings(want)
    assert grad_modes == [True, True] and torch.is_grad_enabled()


def test_stop_strings_cut_the_text(backend):
    base = SamplingParams(max_new_tokens=10)
    [full] = backend.generate([TextRequest(prompt=PROMPTS[2], sampling=base)])
    words = [t.text for t in full.steered.tokens]
    k = next(i for i in range(2, len(words)) if words[i].strip() and words[i] not in words[:i])
    stop = words[k].strip()
    [cut] = backend.generate([TextRequest(prompt=PROMPTS[2], sampling=dataclasses.replace(base, stop=(stop,)))])
    assert cut.steered.finish_reason == "stop"
    assert cut.steered.text == full.steered.text[: full.steered.text.index(stop)]
    assert _ids(cut.steered) == _ids(full.steered)[: k + 1]
    assert stop not in cut.steered.text


def test_chat_messages_use_the_chat_template(backend):
    messages = (ChatMessage("user", "the cat is red"), ChatMessage("assistant", "yes"), ChatMessage("user", "the dog"))
    [res] = backend.generate([TextRequest(messages=messages, sampling=SamplingParams(max_new_tokens=6))])
    tok = backend.tokenizer
    text = tok.apply_chat_template([dataclasses.asdict(m) for m in messages], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert ids[0, 0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
    out = backend.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=backend.pad_id)
    assert _ids(res.steered) == out[0, ids.shape[1]:].tolist()[: len(res.steered.tokens)]
    no_template = CausalLmBackend(backend.model, _without_template(tok), backend.saes)
    with pytest.raises(InvalidArgument) as err:
        no_template.validate(TextRequest(messages=messages))
    assert err.value.field == "messages"


def _without_template(tok):
    from transformers import AutoTokenizer

    copy = AutoTokenizer.from_pretrained(tok.name_or_path)
    copy.chat_template = None
    return copy


# -- readouts, risk, mitigation, encode ----------------------------------------------------------------
def _s0_latents(backend, ids):
    """Latents (T, d_sae) of s0 at the output of layer 0, captured by a hand hook (no edits)."""
    got = {}
    h = backend.model.model.layers[0].register_forward_hook(lambda m, a, o: got.setdefault("x", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            backend.model(input_ids=torch.tensor([ids]))
    finally:
        h.remove()
    return backend.saes["s0"].encode(got["x"][0])


def test_risk_scores_and_readouts_match_hand_pooling(backend):
    [res] = backend.generate([TextRequest(prompt=PROMPTS[0], readout=ReadoutSpec(("s0",), 4), sampling=SamplingParams(max_new_tokens=6))])
    prompt_ids = backend.tokenizer(PROMPTS[0])["input_ids"]
    gen_ids = _ids(res.steered)
    f = _s0_latents(backend, prompt_ids + gen_ids)
    n = len(prompt_ids)
    fp, fg = f[:n], f[n:]
    probe = backend.risk_probe
    want_prompt = probe.score_prompt({"s0": PooledStats(fp.mean(0), fp.amax(0))})
    want_final = probe.score_final({"s0": PooledStats(fp.mean(0), fp.amax(0), fg.mean(0), fg.amax(0))})
    assert res.risk_prompt.probability == pytest.approx(want_prompt.probability, abs=1e-5)
    assert res.risk_final.probability == pytest.approx(want_final.probability, abs=1e-5)
    assert res.risk_final.contributions and res.risk_final.contributions[0].sae == "s0"
    # per-position readouts: prompt positions then one per generated token (its own position)
    assert len(res.prompt_latents) == n and len(res.steered.tokens) == len(gen_ids)
    for row, lat in zip(f, [p[0] for p in res.prompt_latents] + [t.latents[0] for t in res.steered.tokens]):
        top = row.topk(4)
        assert [a.index for a in lat.before] == top.indices.tolist()
        assert [a.value for a in lat.before] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert lat.after == lat.before
    assert [a.index for a in res.pooled[0].top_max] == f.amax(0).topk(4).indices.tolist()
    assert [a.value for a in res.pooled[0].top_mean] == pytest.approx(f.mean(0).topk(4).values.tolist(), abs=1e-4)
    labels = {a.index: a.label for p in res.prompt_latents for a in p[0].before}
    assert all(labels[i] == {3: "red", 5: "blue"}.get(i) for i in labels)


def test_mitigation_ablates_the_probes_top_latents(backend):
    top = backend.risk_probe.top_risk_latents(3)
    assert len(top) == 3 and all(s == "s0" for s, _ in top)
    base = TextRequest(prompt=PROMPTS[0], readout=ReadoutSpec(("s0",), D_SAE), sampling=SamplingParams(max_new_tokens=6))
    [mitigated, explicit] = backend.generate([
        dataclasses.replace(base, mitigate_risk_top_n=3),
        dataclasses.replace(base, plan=InterventionPlan((LatentEdit("s0", EditOp.ABLATE, tuple(i for _, i in top)),))),
    ])
    assert_close(mitigated, explicit)
    ablated = {i for _, i in top}
    positions = [p[0] for p in mitigated.prompt_latents] + [t.latents[0] for t in mitigated.steered.tokens]
    assert any(ablated & {a.index for a in p.before} for p in positions)
    assert all(not ablated & {a.index for a in p.after} for p in positions)


def test_encode_reads_latents_without_generating(backend):
    res = backend.encode(EncodeRequest(text=PROMPTS[1], saes=("s0",), top_k=3))
    ids = backend.tokenizer(PROMPTS[1])["input_ids"]
    f = _s0_latents(backend, ids)
    assert res.tokens == tuple(backend.tokenizer.decode([i]) for i in ids)
    assert [[a.index for a in p[0].before] for p in res.latents] == f.topk(3).indices.tolist()
    assert res.risk.probability == pytest.approx(
        backend.risk_probe.score_prompt({"s0": PooledStats(f.mean(0), f.amax(0))}).probability, abs=1e-5)


# -- validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, error, field",
    [
        (dict(prompt=""), InvalidArgument, "prompt"),
        (dict(prompt=" ".join(["cat"] * 40)), TooLarge, "prompt"),
        (dict(sampling=SamplingParams(top_p=0.0)), InvalidArgument, "sampling.top_p"),
        (dict(sampling=SamplingParams(top_p=1.5)), InvalidArgument, "sampling.top_p"),
        (dict(sampling=SamplingParams(temperature=-1.0)), InvalidArgument, "sampling.temperature"),
        (dict(sampling=SamplingParams(temperature=math.nan)), InvalidArgument, "sampling.temperature"),
        (dict(sampling=SamplingParams(top_k=-1)), InvalidArgument, "sampling.top_k"),
        (dict(sampling=SamplingParams(max_new_tokens=0)), InvalidArgument, "sampling.max_new_tokens"),
        (dict(sampling=SamplingParams(max_new_tokens=33)), TooLarge, "sampling.max_new_tokens"),
        (dict(sampling=SamplingParams(repetition_penalty=0.0)), InvalidArgument, "sampling.repetition_penalty"),
        (dict(sampling=SamplingParams(stop=("",))), InvalidArgument, "sampling.stop[0]"),
        (dict(plan=InterventionPlan((LatentEdit("s0", EditOp.SET, (D_SAE,), 1.0),))), InvalidArgument, "plan.edits[0].latents"),
        (dict(plan=InterventionPlan((LatentEdit("nope", EditOp.SET, (1,), 1.0),))), NotFound, "plan.edits[0].sae"),
        (dict(plan=InterventionPlan((LatentEdit("s0", EditOp.SET, tuple(range(9)), 1.0),))), TooLarge, "plan.edits"),
        (dict(readout=ReadoutSpec(("s0", "nope"))), NotFound, "readout.saes[1]"),
        (dict(logprobs=-1), InvalidArgument, "logprobs"),
        (dict(mitigate_risk_top_n=-2), InvalidArgument, "mitigate_risk_top_n"),
        (dict(image=b"\x89PNG"), InvalidArgument, "image"),
        (dict(messages=(ChatMessage("user", "hi"),)), InvalidArgument, "messages"),  # prompt and messages both set
    ],
)
def test_validation_errors_name_the_field(backend, change, error, field):
    with pytest.raises(error) as err:
        backend.validate(dataclasses.replace(TextRequest(prompt="the cat"), **change))
    assert err.value.field == field


def test_validate_resolves_labels_and_batch_errors_name_the_request(backend):
    req = TextRequest(prompt="the cat", plan=InterventionPlan((LatentEdit("s0", EditOp.SET, (), 2.0, labels=("blue",)),)))
    assert backend.validate(req).plan.edits[0].latents == (5,)
    with pytest.raises(InvalidArgument) as err:
        backend.generate([req, TextRequest(prompt="the cat", sampling=SamplingParams(top_p=2.0))])
    assert err.value.field == "requests[1].sampling.top_p"
    with pytest.raises(NotFound) as err:
        backend.validate(EncodeRequest(text="a", saes=("x",)))
    assert err.value.field == "saes[0]"
