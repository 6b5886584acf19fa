"""FF-KV, G-SAE and SpaDE dictionaries: built, trained, saved and loaded through the user's code path,
with their maths checked against independent computations."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sae_runtime.backends.loading import load_spec_saes
from sae_runtime.backends.spec import ModelSpec, SaeSpec
from sae_runtime.demo import world
from sae_runtime.demo.tiny_models import build_tiny_causal_lm
from sae_runtime.errors import InvalidArgument
from sae_runtime.formats import load_sae, save_native
from sae_runtime.metrics import reconstruction_metrics
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit, ReadoutSpec
from sae_runtime.saes.ffkv import FfkvSae, ffkv_from_model
from sae_runtime.saes.spade import sparsemax
from sae_runtime.sites import HookSite
from sae_runtime.steering import AttachedSae, SteeringContext
from sae_runtime.training.activations import capture
from sae_runtime.training.gsae import GsaeTrainConfig, train_gsae
from sae_runtime.training.logistic import auroc
from sae_runtime.training.spade import SpadeTrainConfig, sparsemax_top, train_spade

D, D_FF = 32, 64


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llama"), "llama", seed=3, num_layers=3, init_std=0.2)


@pytest.fixture(scope="module")
def llama(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 7], [1, 8, 8, 40, 41, 3, 2]])


def _mlp_io(model, layer: int, ids=IDS):
    """(MLP input, MLP output) of decoder layer ``layer`` by a plain forward hook (a second code path)."""
    seen = {}

    def grab(mod, args, out):
        seen["in"], seen["out"] = args[0].detach(), out.detach()

    handle = model.model.layers[layer].mlp.register_forward_hook(grab)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen["in"], seen["out"]


# -- FF-KV ------------------------------------------------------------------------------------
def test_ffkv_neurons_and_values_are_the_mlp(llama):
    sae = ffkv_from_model(llama, 1)
    assert (sae.d_in, sae.d_sae, sae.cfg.hook_name) == (2 * D, D_FF, "blocks.1.hook_mlp_io")
    mlp = llama.model.layers[1].mlp
    x_in, x_out = _mlp_io(llama, 1)
    site = capture(llama, "blocks.1.hook_mlp_io", IDS)
    assert torch.equal(site, torch.cat([x_in, x_out], -1))
    m = sae.encode(site)
    by_hand = torch.nn.functional.silu(x_in @ mlp.gate_proj.weight.T) * (x_in @ mlp.up_proj.weight.T)
    assert torch.allclose(m, by_hand, atol=1e-6)
    assert torch.equal(sae.value_vectors()[7], mlp.down_proj.weight[:, 7])
    assert torch.allclose(sae(site)[..., D:], x_out, atol=1e-6)  # every neuron: the MLP itself
    metrics = reconstruction_metrics(sae, site.reshape(-1, 2 * D))
    assert metrics.fvu < 1e-10 and metrics.l0 == D_FF


def test_ffkv_topk_keeps_the_largest_signed_activations(llama):
    sae = ffkv_from_model(llama, 0, k=5)
    site = capture(llama, "blocks.0.hook_mlp_io", IDS)
    m = ffkv_from_model(llama, 0).encode(site)
    f = sae.encode(site)
    kept = f != 0
    assert bool((kept.sum(-1) == 5).all())
    fifth = m.topk(5, dim=-1).values[..., -1:]
    assert torch.equal(f[kept], m[kept]) and bool((m[kept.logical_not()] <= fifth.expand_as(m)[kept.logical_not()]).all())


def test_ffkv_clamp_moves_the_mlp_output_by_delta_m_times_value(llama):
    sae = ffkv_from_model(llama, 1)
    saes = {"kv": AttachedSae("kv", sae, HookSite.parse(sae.cfg.hook_name))}
    x_in, x_out = _mlp_io(llama, 1)
    m = sae.encode(torch.cat([x_in, x_out], -1))
    with torch.no_grad():
        clean = llama(input_ids=IDS).logits
    plan = InterventionPlan(edits=(LatentEdit(sae="kv", op=EditOp.SET, latents=(11,), value=3.5),)).resolve({"kv": sae})
    seen = {}
    handle = llama.model.layers[1].mlp.register_forward_hook(lambda mod, a, out: seen.setdefault("out", out.detach()))
    try:
        with torch.no_grad(), SteeringContext(llama, saes, [plan, plan]):
            steered = llama(input_ids=IDS).logits
    finally:
        handle.remove()
    expected = x_out + (3.5 - m[..., 11:12]) * sae.value_vectors()[11]
    assert torch.allclose(seen["out"], expected, atol=1e-6)
    assert not torch.allclose(steered, clean)
    # an empty plan, and a readout alone, leave the forward bit-identical
    for plans, readout in (([InterventionPlan(), None], None), ([None, None], ReadoutSpec(("kv",), 4))):
        with torch.no_grad(), SteeringContext(llama, saes, plans, readout) as ctx:
            again = llama(input_ids=IDS).logits
        assert torch.equal(again, clean)
    top = ctx.readouts()[0]["kv"]
    assert top is not None


def test_ffkv_gpt2_mlp(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(build_tiny_causal_lm(tmp_path, "gpt2", seed=1, init_std=0.2)).eval()
    sae = ffkv_from_model(model, 1)
    assert sae.gated is False
    site = capture(model, "blocks.1.hook_mlp_io", IDS)
    assert torch.allclose(sae(site)[..., D:], site[..., D:], atol=1e-5)


def test_ffkv_config_entry_loads_with_labels_and_needs_the_model(llama, llama_dir, tmp_path):
    from services.config import ModelConfig

    (tmp_path / "labels.json").write_text(json.dumps({"labels": {"color:red": 3}}))
    cfg = ModelConfig.model_validate(
        {"name": "m", "kind": "causal_lm", "path": str(llama_dir), "saes": [{"name": "kv", "ffkv": {"layer": 2, "k": 8}, "path": str(tmp_path)}]}
    )
    spec = cfg.to_spec(tmp_path)
    assert spec.saes[0] == SaeSpec("kv", str(tmp_path.resolve()), ffkv_layer=2, ffkv_k=8)
    saes, seconds = load_spec_saes(spec, llama)
    assert isinstance(saes["kv"], FfkvSae) and saes["kv"].k == 8 and saes["kv"].labels == {"color:red": 3}
    assert set(seconds) == {"kv"}
    with pytest.raises(InvalidArgument) as err:
        load_spec_saes(spec)
    assert err.value.field == "saes.kv.ffkv"
    with pytest.raises(ValueError, match="ffkv"):
        ModelConfig.model_validate({"name": "m", "kind": "causal_lm", "path": "x", "saes": [{"name": "kv", "ffkv": {"layer": 0}, "hub_id": "a/b"}]})


def test_ffkv_through_the_backend(llama, llama_dir):
    from transformers import AutoTokenizer

    from sae_runtime.backends.causal_lm import CausalLmBackend
    from sae_runtime.backends.types import SamplingParams, TextRequest

    spec = ModelSpec(name="m", kind="causal_lm", path=str(llama_dir), saes=(SaeSpec("kv", "", ffkv_layer=1, ffkv_k=6),))
    saes, _ = load_spec_saes(spec, llama)
    backend = CausalLmBackend(llama, AutoTokenizer.from_pretrained(llama_dir), saes)
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0)
    base = backend.generate([backend.validate(TextRequest(prompt="a b c", sampling=sampling))])[0]
    plan = InterventionPlan(edits=(LatentEdit(sae="kv", op=EditOp.SET, latents=(2,), value=50.0),))
    both = backend.generate([
        backend.validate(TextRequest(prompt="a b c", sampling=sampling)),
        backend.validate(TextRequest(prompt="a b c", sampling=sampling, plan=plan)),
    ])  # fmt: skip
    assert both[0].steered.text == base.steered.text  # the unedited row is untouched by its neighbour
    assert both[1].steered.tokens != base.steered.tokens


# -- G-SAE ------------------------------------------------------------------------------------
def test_gsae_trains_its_reserved_latents_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, d = 4000, 16
    y = (torch.rand(n, 2, generator=g) < 0.3).float()
    dirs = torch.randn(2, d, generator=g) * 3
    x = torch.randn(n, d, generator=g) + y @ dirs + 5.0  # an offset the standardisation removes
    sae, hist = train_gsae(x[:3000], y[:3000], ["c0", "c1"], GsaeTrainConfig(d_sae=32, k=4, steps=300, batch_size=256, lr=3e-3))
    assert hist[-1]["cond"] < hist[0]["cond"] and hist[-1]["nmse"] < hist[0]["nmse"]
    x_n, _ = sae.normalize(x[3000:])
    h = sae.sae_input(x_n) @ sae.W_enc + sae.b_enc
    for c in range(2):  # the reserved pre-activation predicts its concept on held-out rows
        assert auroc(h[:, c], y[3000:, c]) > 0.95
    assert sae.labels == {"c0": 0, "c1": 1} and sae.cfg.n_concepts == 2
    loaded = load_sae(save_native(sae, tmp_path / "gsae"))
    assert loaded.cfg.architecture == "topk-sigmoid" and loaded.labels == sae.labels
    assert torch.equal(loaded.encode(x[:50]), sae.encode(x[:50]))
    f = sae.encode(x[:50])
    assert bool(((f > 0).sum(-1) == 4).all()) and float(f.max()) < 1.0


# -- SpaDE ------------------------------------------------------------------------------------
def test_partial_sort_sparsemax_equals_the_full_one():
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(50, 40, generator=g) * torch.tensor([0.1, 5.0]).repeat(25)[:, None]).double()
    assert torch.allclose(sparsemax_top(z, 4), sparsemax(z), atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: sparsemax_top(t, 4), (z[:6].clone().requires_grad_(),))


def test_spade_learns_clusters_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(6, 8, generator=g) * 4 + 2.0
    x = centres[torch.randint(0, 6, (3000,), generator=g)] + 0.1 * torch.randn(3000, 8, generator=g)
    sae, hist = train_spade(x, SpadeTrainConfig(d_sae=16, steps=300, batch_size=256))
    f = sae.encode(x)
    assert torch.allclose(f.sum(-1), torch.ones(3000), atol=1e-5) and bool((f >= 0).all())
    m = reconstruction_metrics(sae, x)
    assert m.fvu < 0.05 and m.l0 < 4
    loaded = load_sae(save_native(sae, tmp_path / "spade"))
    assert torch.allclose(loaded.encode(x[:100]), f[:100], atol=1e-6)
    assert torch.allclose(loaded(x[:100]), sae(x[:100]), atol=1e-5)


# -- the concept world's parent concepts --------------------------------------------------------
def test_parent_concepts_cover_each_family():
    assert world.parent_concept("fox") == "is:animal" and world.parent_concept("the") is None
    assert set(world.PARENT_CONCEPTS["is:color"]) == set(world.FAMILIES["color"])
    assert sorted(w for ws in world.PARENT_CONCEPTS.values() for w in ws) == sorted(w for w in world.vocabulary() if world.family_of(w))


# -- the EvaluateSae runtime side and the report's PNG ------------------------------------------
def test_evaluate_on_texts_matches_a_second_path_and_respects_limits(llama, llama_dir):
    from transformers import AutoTokenizer

    from sae_runtime.backends.spec import Limits
    from sae_runtime.errors import TooLarge
    from sae_runtime.evaluate import evaluate_on_texts
    from sae_runtime.training.evaluation import fvu

    tok = AutoTokenizer.from_pretrained(llama_dir)
    sae = ffkv_from_model(llama, 1, k=8)
    texts = ["a b c d", "e f g"]
    m = evaluate_on_texts(llama, tok, sae, texts, Limits(max_batch_size=2, max_prompt_tokens=16))
    rows = torch.cat([capture(llama, "blocks.1.hook_mlp_io", tok(t, return_tensors="pt")["input_ids"])[0] for t in texts])
    assert m.n_tokens == rows.shape[0] and m.l0 == 8.0
    assert m.fvu == pytest.approx(fvu(rows[:, D:], sae(rows)[:, D:]), rel=1e-5)
    # loss with the dictionary spliced in, by a hand-written MLP hook on one unpadded text
    one = evaluate_on_texts(llama, tok, sae, texts[:1])
    ids = tok(texts[0], return_tensors="pt")["input_ids"]

    def splice(mod, args, out):
        return sae(torch.cat([args[0], out], -1))[..., D:]

    handle = llama.model.layers[1].mlp.register_forward_hook(splice)
    with torch.no_grad():
        logits = llama(input_ids=ids).logits
    handle.remove()
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert one.loss_with_dict == pytest.approx(float(ce), rel=1e-5)
    z, c, w = one.loss_zero_ablated, one.loss_clean, one.loss_with_dict
    assert one.loss_recovered == pytest.approx((z - w) / (z - c))
    with pytest.raises(TooLarge) as err:
        evaluate_on_texts(llama, tok, sae, texts * 2, Limits(max_batch_size=3))
    assert err.value.field == "texts"
    with pytest.raises(TooLarge) as err:
        evaluate_on_texts(llama, tok, sae, ["a b c d e f"], Limits(max_prompt_tokens=3))
    assert err.value.field == "texts[0]"
    with pytest.raises(InvalidArgument):
        evaluate_on_texts(llama, tok, sae, [" "])


def test_png_of_latent_distributions(tmp_path):
    from PIL import Image

    from sae_runtime.evaluate import _histogram, write_png

    assert _histogram([0.0, 0.1, 0.95, 1.0, float("nan")], 2, 0.0, 1.0) == [2, 2]
    write_png(tmp_path / "d.png", {"a": {"MS": [0.2, 0.9]}, "b": {"MS": [0.5]}}, {"MS": (0.0, 1.0), "share": (-6.0, 0.0)})
    img = Image.open(tmp_path / "d.png")
    assert img.format == "PNG" and img.size == (24 + 2 * 284, 24 + 2 * 168)


def test_evaluate_sae_request_and_response_through_the_backend(llama, llama_dir):
    from steering.v1 import steering_pb2 as pb
    from transformers import AutoTokenizer

    from sae_runtime.backends.causal_lm import CausalLmBackend
    from sae_runtime.errors import NotFound
    from sae_runtime.evaluate import evaluate_backend_sae, evaluate_on_texts
    from services import convert

    tok = AutoTokenizer.from_pretrained(llama_dir)
    backend = CausalLmBackend(llama, tok, {"kv": ffkv_from_model(llama, 2, k=4)})
    for skip in (False, True):
        req = pb.EvaluateSaeRequest.FromString(pb.EvaluateSaeRequest(model="m", sae="kv", texts=["a b c", "d e"], skip_loss=skip).SerializeToString())
        sae, texts, with_loss = convert.evaluate_sae_request_from_proto(req)
        m = evaluate_backend_sae(backend, sae, texts, with_loss)
        msg = convert.evaluate_sae_result_to_proto(m, timings=pb.Timings(), versions=pb.Versions())
        direct = evaluate_on_texts(llama, tok, backend.saes["kv"], ["a b c", "d e"], with_loss=False)
        assert (msg.l0, msg.n_tokens) == (4.0, direct.n_tokens) and msg.fvu == pytest.approx(direct.fvu)
        assert msg.HasField("loss_recovered") is not skip
    with pytest.raises(NotFound) as err:
        evaluate_backend_sae(backend, "nope", ["a"])
    assert err.value.field == "sae"
    with pytest.raises(InvalidArgument):
        convert.evaluate_sae_request_from_proto(pb.EvaluateSaeRequest(model="m", texts=["a"]))
