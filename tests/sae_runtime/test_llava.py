"""LLaVA backend on a tiny random LlavaForConditionalGeneration saved and reloaded with from_pretrained."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from sae_runtime.backends.llava import LlavaBackend
from sae_runtime.backends.spec import Limits, ModelSpec, SaeSpec
from sae_runtime.backends.types import ChatMessage, EncodeRequest, SamplingParams, TextRequest
from sae_runtime.demo import tiny_saes
from sae_runtime.demo.tiny_models import build_tiny_llava
from sae_runtime.errors import InvalidArgument, TooLarge
from sae_runtime.formats import save_native
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit, ReadoutSpec, Scope, VisionScope

FEATURE_LAYER = "vision.layers.1"  # hidden_states[-2] of a 3-layer tower: what the projector reads
EARLY_LAYER = "vision.layers.0"
LM_SITE = "blocks.0.hook_resid_post"
N_VISION = 17  # CLS + (16 / 4) ** 2 patches


def random_sae(hook: str, seed: int, d_in: int = 32, d_sae: int = 64):
    return tiny_saes.random_sae(d_in, d_sae, hook, seed=seed)


def png(seed: int, size: int = 20) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llava")
    path = build_tiny_llava(root / "model", seed=0)
    specs = []
    for name, hook, seed in (("vis", FEATURE_LAYER, 1), ("vis0", EARLY_LAYER, 2), ("lm", LM_SITE, 3)):
        save_native(random_sae(hook, seed), root / name)
        specs.append(SaeSpec(name=name, path=str(root / name)))
    return path, tuple(specs)


@pytest.fixture(scope="module")
def backend(model_dir):
    path, saes = model_dir
    return LlavaBackend.from_spec(ModelSpec(name="tiny-llava", kind="llava", path=str(path), saes=saes,
                                            limits=Limits(max_image_bytes=10_000, max_image_side=64)))


def greedy(n: int = 6, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def generate(backend, **kw):
    return backend.generate([backend.validate(TextRequest(**kw))])[0]


class LayerRecorder:
    """Records a vision layer's output after every hook (the steering hooks are prepended)."""

    def __init__(self, backend, site: str):
        layer = backend.model.model.vision_tower.encoder.layers[int(site.rsplit(".", 1)[1])]
        self.outputs: list[torch.Tensor] = []
        self.handle = layer.register_forward_hook(lambda m, a, o: self.outputs.append((o[0] if isinstance(o, tuple) else o).detach().clone()))

    def close(self):
        self.handle.remove()


def test_empty_plan_equals_hf_generate(backend, model_dir):
    path, _ = model_dir
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    image = Image.open(io.BytesIO(png(0))).convert("RGB")
    inputs = processor(images=[image], text=["<image>\nwhat is the red cat"], return_tensors="pt")
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)[0, inputs.input_ids.shape[1]:]
    res = generate(backend, prompt="what is the red cat", image=png(0), sampling=greedy(6))
    assert [t.id for t in res.steered.tokens] == want.tolist()


def test_clamping_a_vision_latent_changes_the_output(backend):
    plan = InterventionPlan(edits=(LatentEdit(sae="vis", op=EditOp.SET, latents=(5, 9), value=60.0),))
    res = generate(backend, prompt="what is this", image=png(1), sampling=greedy(6), plan=plan, include_default=True, logprobs=3)
    steered, default = res.steered.tokens, res.default.tokens
    assert [t.top_logprobs for t in steered] != [t.top_logprobs for t in default]
    assert abs(steered[0].top_logprobs[0][1] - default[0].top_logprobs[0][1]) > 1e-3
    # The twin is the unsteered model: identical to a request without a plan.
    plain = generate(backend, prompt="what is this", image=png(1), sampling=greedy(6), logprobs=3)
    assert [t.id for t in plain.steered.tokens] == [t.id for t in default]


@pytest.mark.parametrize("value", [30.0, 100.0])
def test_large_clamps_all_vision_positions_with_and_without_error_term(backend, value):
    for preserve in (True, False):
        plan = InterventionPlan(edits=(LatentEdit(sae="vis", op=EditOp.SET, latents=(3,), value=value),), preserve_error=preserve)
        rec = LayerRecorder(backend, FEATURE_LAYER)
        try:
            res = generate(backend, prompt="what is this", image=png(2), sampling=greedy(4), plan=plan, include_default=True, logprobs=1)
        finally:
            rec.close()
        edited, clean = rec.outputs[0][0], rec.outputs[0][1]  # vision batch: [steered row, default twin]
        sae = backend.saes["vis"]
        f_clean = torch.relu((clean - sae.b_dec) @ sae.W_enc + sae.b_enc)  # hand-written standard encode
        if preserve:
            want = clean + (value - f_clean[:, 3:4]) * sae.W_dec[3]
        else:
            f_clean[:, 3] = value
            want = f_clean @ sae.W_dec + sae.b_dec
        torch.testing.assert_close(edited, want, rtol=1e-4, atol=1e-4)
        assert all(np.isfinite(t.logprob) for t in res.steered.tokens)


def layer_output(backend, site: str, **kw) -> torch.Tensor:
    """The vision layer's (edited) output for one solo request (batch of 1: bitwise reproducible)."""
    rec = LayerRecorder(backend, site)
    try:
        generate(backend, prompt="what is this", sampling=greedy(1), **kw)
    finally:
        rec.close()
    return rec.outputs[0][0]


def test_cls_scope_edits_only_the_cls_position(backend):
    value, latent = 50.0, 7
    edit = LatentEdit(sae="vis0", op=EditOp.SET, latents=(latent,), value=value)
    clean = layer_output(backend, EARLY_LAYER, image=png(3))
    edited = layer_output(backend, EARLY_LAYER, image=png(3), plan=InterventionPlan(edits=(edit,), scope=Scope(vision=VisionScope.CLS)))
    assert edited.shape == (N_VISION, 32)
    diff = edited - clean
    assert torch.equal(diff[1:], torch.zeros_like(diff[1:]))
    sae = backend.saes["vis0"]
    f_cls = torch.relu((clean[0] - sae.b_dec) @ sae.W_enc[:, latent] + sae.b_enc[latent])
    torch.testing.assert_close(diff[0], (value - f_cls) * sae.W_dec[latent], rtol=1e-4, atol=1e-4)
    # Scope "all" edits every position.
    edited_all = layer_output(backend, EARLY_LAYER, image=png(3), plan=InterventionPlan(edits=(edit,)))
    assert ((edited_all - clean).abs().amax(-1) > 1e-3).all()


def test_vision_readouts_match_an_independent_encode(backend):
    rec = LayerRecorder(backend, FEATURE_LAYER)
    try:
        res = generate(backend, prompt="what is this", image=png(4), sampling=greedy(3), readout=ReadoutSpec(saes=("vis", "lm"), top_k=3))
    finally:
        rec.close()
    sae = backend.saes["vis"]
    acts = torch.relu((rec.outputs[0][0] - sae.b_dec) @ sae.W_enc + sae.b_enc)  # (17, 64)
    assert len(res.vision_latents) == N_VISION
    for pos, entries in enumerate(res.vision_latents):
        (entry,) = entries
        assert entry.sae == "vis"
        want = torch.topk(acts[pos], 3)
        assert [a.index for a in entry.before] == [i for i, v in zip(want.indices.tolist(), want.values.tolist()) if v != 0]
        np.testing.assert_allclose([a.value for a in entry.before], [v for v in want.values.tolist() if v != 0], rtol=1e-4)
    pooled = {p.sae: p for p in res.pooled}
    assert set(pooled) == {"vis", "lm"}
    mean = acts.mean(0)
    assert [a.index for a in pooled["vis"].top_mean] == torch.topk(mean, 3).indices.tolist()
    # Language-model SAE readouts stay per prompt token / generated token.
    assert len(res.prompt_latents) > N_VISION - 1 and all(len(p) == 1 and p[0].sae == "lm" for p in res.prompt_latents)
    assert all(t.latents and t.latents[0].sae == "lm" for t in res.steered.tokens)


def test_batched_rows_with_different_plans_and_images_match_solo_runs(backend):
    plan = InterventionPlan(edits=(LatentEdit(sae="vis", op=EditOp.SET, latents=(2,), value=40.0),))
    reqs = [
        backend.validate(TextRequest(prompt="what is this", image=png(5), sampling=greedy(5), plan=plan)),
        backend.validate(TextRequest(prompt="the cat is", sampling=SamplingParams(max_new_tokens=5, temperature=1.0, seed=3))),
        backend.validate(TextRequest(prompt="what is that", image=png(6), sampling=SamplingParams(max_new_tokens=5, temperature=0.8, seed=9), include_default=True)),
    ]
    batched = backend.generate(reqs)
    for req, got in zip(reqs, batched):
        [solo] = backend.generate([req])
        assert [t.id for t in got.steered.tokens] == [t.id for t in solo.steered.tokens]
    assert [t.id for t in batched[2].default.tokens] == [t.id for t in batched[2].steered.tokens]


def test_chat_messages_get_the_image(backend):
    res = generate(backend, messages=(ChatMessage("user", "what is this"),), image=png(7), sampling=greedy(2),
                   readout=ReadoutSpec(saes=("lm",), top_k=1))
    # 16 image tokens reach the language model, in the chat-formatted prompt.
    tokens = backend.encode(EncodeRequest(text="what is this", image=png(7), saes=("lm",))).tokens
    assert tokens.count("<image>") == 16
    assert len(res.prompt_latents) >= 16 + 3


def test_encode_returns_vision_and_text_latents(backend):
    res = backend.encode(EncodeRequest(text="what is this", image=png(8), saes=("vis", "lm"), top_k=2))
    assert len(res.vision_latents) == N_VISION and all(p[0].sae == "vis" for p in res.vision_latents)
    assert len(res.latents) == len(res.tokens) and all(p[0].sae == "lm" for p in res.latents)
    assert {p.sae for p in res.pooled} == {"vis", "lm"}


def test_image_errors_name_the_field(backend):
    with pytest.raises(InvalidArgument) as e:
        backend.validate(TextRequest(prompt="what", image=b"\x89PNG\r\n\x1a\nnot really"))
    assert e.value.field == "image"
    with pytest.raises(InvalidArgument) as e:
        backend.validate(TextRequest(prompt="what", image=b""))
    assert e.value.field == "image"
    with pytest.raises(TooLarge) as e:
        backend.validate(TextRequest(prompt="what", image=png(0, size=80)))
    assert e.value.field == "image"
    with pytest.raises(InvalidArgument) as e:
        backend.validate(TextRequest(prompt="<image> what"))
    assert e.value.field == "image"
    with pytest.raises(InvalidArgument) as e:
        backend.generate([TextRequest(prompt="a", image=png(0)), TextRequest(prompt="b", image=b"junk")])
    assert e.value.field == "requests[1].image"
    with pytest.raises(InvalidArgument) as e:
        backend.validate(EncodeRequest(text="x", image=b"junk"))
    assert e.value.field == "image"
    # Encode checks image tokens as generation does (found by fuzzing: a second <image> crashed the processor).
    with pytest.raises(InvalidArgument) as e:
        backend.validate(EncodeRequest(text="<image> what <image>", image=png(0)))
    assert e.value.field == "text"
    with pytest.raises(InvalidArgument) as e:
        backend.encode(EncodeRequest(text="<image> what"))
    assert e.value.field == "image"
    with pytest.raises(InvalidArgument) as e:
        backend.validate(TextRequest(prompt="<image> a <image>", image=png(0)))
    assert e.value.field == "prompt"


def test_info_lists_vision_and_text_saes(backend):
    info = backend.info()
    assert info.kind == "llava"
    assert {s.name: s.hook_name for s in info.saes} == {"vis": FEATURE_LAYER, "vis0": EARLY_LAYER, "lm": LM_SITE}


def test_stream_matches_generate(backend):
    plan = InterventionPlan(edits=(LatentEdit(sae="vis", op=EditOp.SET, latents=(1,), value=35.0),))
    req = backend.validate(TextRequest(prompt="what is this", image=png(9), sampling=greedy(4), plan=plan,
                                       readout=ReadoutSpec(saes=("vis",), top_k=2)))
    events = list(backend.stream(req))
    final = events[-1].result
    [want] = backend.generate([req])
    assert [e.token.id for e in events[:-1]] == [t.id for t in want.steered.tokens] == [t.id for t in final.steered.tokens]
    assert final.vision_latents == want.vision_latents and len(final.vision_latents) == N_VISION


def test_image_rows_join_text_rows_already_decoding_in_the_engine(backend):
    """A text row decodes; image rows (one clamped on the vision SAE) join its running steps."""
    plan = InterventionPlan(edits=(LatentEdit(sae="vis", op=EditOp.SET, latents=(2,), value=40.0),))
    reqs = [
        backend.validate(TextRequest(prompt="the cat is", sampling=greedy(8))),
        backend.validate(TextRequest(prompt="what is this", image=png(5), sampling=greedy(5), plan=plan)),
        backend.validate(TextRequest(prompt="what is that", image=png(6), sampling=SamplingParams(max_new_tokens=4, temperature=0.8, seed=9))),
    ]
    solo = [backend.generate([r])[0] for r in reqs]
    engine = backend.engine
    text = engine.submit(reqs[0])
    engine.step()
    engine.step()
    images = [engine.submit(r) for r in reqs[1:]]
    stats = engine.step()
    assert stats.decoded_rows == 3 and stats.prefill_tokens > 0  # the image rows' prefill, then one decode of all three
    engine.wait([text, *images])
    for run, want in zip([text, *images], solo):
        assert [t.id for t in run.result.steered.tokens] == [t.id for t in want.steered.tokens]


def test_variants_with_vision_edits_equal_each_plan_sent_alone(backend):
    """Variants are more rows of one request: each with its own vision/text edits and the request's
    seed, image encoded per row under that row's plan."""
    plans = (
        InterventionPlan(edits=(LatentEdit(sae="vis", op=EditOp.SET, latents=(5, 9), value=60.0),)),
        InterventionPlan(edits=(LatentEdit(sae="lm", op=EditOp.ABLATE, latents=(1, 2, 3)),)),
        InterventionPlan(),
    )
    sampling = SamplingParams(max_new_tokens=6, temperature=0.9, seed=5)
    res = generate(backend, prompt="what is this", image=png(2), sampling=sampling, plan=plans[0], variants=plans[1:])
    solo = [generate(backend, prompt="what is this", image=png(2), sampling=sampling, plan=p) for p in plans]
    assert [t.id for t in res.steered.tokens] == [t.id for t in solo[0].steered.tokens]
    assert [[t.id for t in v.completion.tokens] for v in res.variants] == [[t.id for t in s.steered.tokens] for s in solo[1:]]
    assert [t.id for t in solo[0].steered.tokens] != [t.id for t in solo[2].steered.tokens]  # the vision clamp matters


def test_llava_rows_run_in_an_engine_process_equal_the_in_process_engine(backend, model_dir):
    """engine.separate_process for LLaVA: the image's pixel values cross to the child with the
    validated request, and a vision clamp there gives the in-process engine's tokens."""
    from sae_runtime.backends.spec import EngineConfig
    from sae_runtime.engine.process import EngineProcess

    path, saes = model_dir
    spec = ModelSpec(name="tiny-llava", kind="llava", path=str(path), saes=saes,
                     limits=Limits(max_image_bytes=10_000, max_image_side=64), engine=EngineConfig(separate_process=True))
    plan = InterventionPlan(edits=(LatentEdit(sae="vis", op=EditOp.SET, latents=(2,), value=40.0),))
    requests = [TextRequest(prompt="what is this", image=png(5), sampling=greedy(5), plan=plan, include_default=True),
                TextRequest(prompt="the cat is", sampling=greedy(4))]
    prepared = [backend.validate(r) for r in requests]
    want = backend.generate(prepared)
    proc = EngineProcess(spec, torch_threads=1)
    proc.start()
    try:
        finals: dict[int, object] = {}
        runs = [proc.submit(p, lambda e, i=i: finals.__setitem__(i, e)) for i, p in enumerate(prepared)]
        assert all(r.done.wait(60) for r in runs)
        for i, w in enumerate(want):
            got = finals[i].result
            assert [t.id for t in got.steered.tokens] == [t.id for t in w.steered.tokens]
        assert [t.id for t in finals[0].result.default.tokens] == [t.id for t in want[0].default.tokens]
        assert [t.id for t in want[0].steered.tokens] != [t.id for t in want[0].default.tokens]  # the clamp steers
    finally:
        proc.stop()
