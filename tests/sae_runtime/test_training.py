"""Training toolkit: activation store, SAE trainer, loss recovered, labelling."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sae_runtime.formats import load_sae, save_native, save_saelens
from sae_runtime.saes.standard import JumpReluSae
from sae_runtime.saes.topk import TopKSae
from sae_runtime.training.activations import ActivationStore, tokenize
from sae_runtime.training.evaluation import fvu, l0, loss_recovered
from sae_runtime.training.labelling import apply_labels, label_sae_on_tokens, label_table, precision_recall
from sae_runtime.training.trainer import SaeTrainer, TrainConfig, _JumpReLU, _Step, train_sae

WORDS = "the a cat dog red blue sky sea big small runs sat on in and".split()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is much faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic(n: int, d_in: int = 24, n_feat: int = 48, k: int = 3, seed: int = 0):
    """Rows = sum of k random unit dictionary atoms with magnitudes in [0.5, 2.5], plus an offset."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_feat, d_in, generator=g)
    atoms /= atoms.norm(dim=-1, keepdim=True)
    idx = torch.rand(n, n_feat, generator=g).argsort(-1)[:, :k]
    f = torch.zeros(n, n_feat).scatter(-1, idx, torch.rand(n, k, generator=g) * 2 + 0.5)
    return f @ atoms * 3 + 0.3, atoms


@pytest.fixture(scope="module")
def data():
    x, atoms = synthetic(12000)
    return x[:10000], x[10000:], atoms


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 3-layer Llama (hidden 32) and a word-level tokenizer, saved and loaded back."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path), path


def texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 10, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g)))
    return out


# -- activation store -------------------------------------------------------------------------
def test_activation_store_matches_unpadded_hidden_states(tiny_lm, tmp_path):
    model, tok, _ = tiny_lm
    corpus = texts(11)
    mem = ActivationStore.collect(model, tok, corpus, "blocks.1.hook_resid_post", batch_size=4, progress=False)
    disk = ActivationStore.collect(model, tok, corpus, "blocks.1.hook_resid_post", batch_size=4, out_dir=tmp_path / "acts", shard_tokens=20, progress=False)
    reopened = ActivationStore.open(tmp_path / "acts")
    assert len(reopened.shards) > 1 and reopened.hook_name == "blocks.1.hook_resid_post"
    # the reference: each text alone (no padding), output of layer 1 = input of layer 2
    expected = []
    for t in corpus:
        ids = tok(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected.append(model(ids, output_hidden_states=True).hidden_states[2][0])
    expected = torch.cat(expected)
    assert mem.n_tokens == expected.shape[0] == sum(len(tok(t)["input_ids"]) for t in corpus)
    torch.testing.assert_close(mem.tensor(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(reopened.tensor(), mem.tensor())
    assert torch.equal(reopened.column("token_ids"), torch.cat([tok(t, return_tensors="pt")["input_ids"][0] for t in corpus]))
    # the input of layer 2 is the output of layer 1
    pre = ActivationStore.collect(model, tok, corpus, "blocks.2.hook_resid_pre", batch_size=4, progress=False)
    assert torch.equal(pre.tensor(), mem.tensor())
    # shuffled batches cover every row exactly once per epoch
    rows = torch.cat(list(reopened.batches(7, shuffle=True, seed=3)))
    assert rows.shape == mem.tensor().shape
    assert torch.equal(rows[rows[:, 0].argsort()], mem.tensor()[mem.tensor()[:, 0].argsort()])


# -- trainer ----------------------------------------------------------------------------------
def test_topk_trainer_learns_the_dictionary(data, tmp_path):
    train, held_out, atoms = data
    cfg = TrainConfig("topk", d_sae=64, k=3, steps=300, batch_size=256, lr=3e-3, dead_after_tokens=4000, log_every=100)
    result = train_sae(train, cfg, hook_name="blocks.1.hook_resid_post", eval_acts=held_out, progress=False)
    rep, sae = result.report, result.sae
    assert rep.final.fvu < 0.25 and rep.final.fvu < 0.5 * rep.initial.fvu, (rep.initial, rep.final)
    assert rep.final.l0 <= 3 and int((sae.encode(held_out) != 0).sum(-1).max()) <= 3
    assert isinstance(sae, TopKSae) and sae.cfg.k == 3 and sae.cfg.hook_name == "blocks.1.hook_resid_post"
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5, rtol=0)
    # the exported SAE (input scaling folded in) encodes and reconstructs like the trainer
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(held_out), result.trainer.encode(held_out), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sae(held_out), result.trainer.reconstruct(held_out), atol=1e-4, rtol=1e-4)
        assert fvu(held_out, sae(held_out)) == pytest.approx(rep.final.fvu, rel=1e-3)
    # most dictionary atoms have a decoder row pointing their way
    cos = (atoms @ sae.W_dec.detach().T).amax(1)
    assert (cos > 0.9).float().mean() > 0.8
    # native and SAELens files hold the same SAE
    for save in (save_native, save_saelens):
        loaded = load_sae(save(sae, tmp_path / save.__module__))
        assert torch.equal(loaded.encode(held_out[:50]), sae.encode(held_out[:50]))


def test_batchtopk_saved_as_jumprelu_matches_trainer(data, tmp_path):
    train, held_out, _ = data
    cfg = TrainConfig("batchtopk", d_sae=64, k=3, steps=200, batch_size=256, lr=3e-3, dead_after_tokens=4000)
    result = train_sae(train, cfg, progress=False)
    assert result.report.final.fvu < 0.5 * result.report.initial.fvu
    threshold = float(result.trainer.sae.threshold) / result.trainer.scale
    assert threshold > 0
    for save in (save_native, save_saelens):
        loaded = load_sae(save(result.sae, tmp_path / save.__module__))
        assert isinstance(loaded, JumpReluSae) and loaded.cfg.architecture == "jumprelu"
        torch.testing.assert_close(loaded.threshold.detach(), torch.full((64,), threshold))
        with torch.no_grad():
            got = loaded.encode(held_out)
        expected = result.trainer.encode(held_out)
        assert torch.equal(got != 0, expected != 0)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # batch-level top-k keeps k per row on average
    assert abs(l0(expected) - 3) < 1.5


@pytest.mark.parametrize("arch", ["jumprelu", "standard"])
def test_jumprelu_and_standard_trainers_reduce_fvu(data, arch):
    train, held_out, _ = data
    cfg = TrainConfig(arch, d_sae=64, steps=250, batch_size=256, lr=3e-3, l1_coeff=0.5, l0_coeff=0.3)
    result = train_sae(train, cfg, eval_acts=held_out, progress=False)
    rep = result.report
    assert rep.final.fvu < 0.3 and rep.final.fvu < 0.2 * rep.initial.fvu, (rep.initial, rep.final)
    assert rep.final.l0 < 0.5 * 64  # sparsity pressure works
    torch.testing.assert_close(result.sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(result.sae.encode(held_out), result.trainer.encode(held_out), atol=1e-4, rtol=1e-4)


def test_jumprelu_pseudo_gradients_match_formula():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, generator=g)
    theta = torch.tensor([0.1, 0.2, -0.3, 0.5], requires_grad=True)
    h[0, 0], h[1, 1], h[2, 3] = 0.11, 0.19, 0.52  # inside the kernel window of width eps
    eps, up = 0.05, torch.randn(5, 4, generator=g)
    hh = h.clone().requires_grad_(True)
    (_JumpReLU.apply(hh, theta, eps) * up).sum().backward()
    window = ((h - theta.detach()).abs() < eps / 2).float()
    assert window.sum() >= 3
    torch.testing.assert_close(theta.grad, (-(theta.detach() / eps) * window * up).sum(0))
    torch.testing.assert_close(hh.grad, up * (h > theta.detach()))
    theta.grad = None
    (_Step.apply(h, theta, eps) * up).sum().backward()
    torch.testing.assert_close(theta.grad, (-(1 / eps) * window * up).sum(0))


def test_decoder_gradient_has_no_radial_part(data):
    train, _, _ = data
    trainer = SaeTrainer(TrainConfig("topk", d_sae=32, k=3, lr=1e-2), train.shape[1], init_batch=train[:256])
    trainer.step(train[:256])
    rows_before = trainer.sae.W_dec.detach().clone()  # unit rows the next step starts from
    trainer.step(train[256:512])
    g = trainer.sae.W_dec.grad  # the (projected) gradient that step used
    assert g is not None and g.abs().sum() > 0
    torch.testing.assert_close((g * rows_before).sum(-1), torch.zeros(32), atol=1e-6, rtol=0)
    torch.testing.assert_close(trainer.sae.W_dec.norm(dim=-1), torch.ones(32), atol=1e-6, rtol=0)
    assert not torch.equal(trainer.sae.W_dec.detach(), rows_before)


def test_trainer_counts_dead_latents():
    x, _ = synthetic(3000, d_in=16, n_feat=8, k=1)
    cfg = TrainConfig("topk", d_sae=64, k=1, steps=60, batch_size=100, lr=3e-3, dead_after_tokens=1000)
    result = train_sae(x, cfg, progress=False)
    # 8 true directions and k=1: most of the 64 latents cannot win a top-1 slot
    assert result.report.final.dead_fraction > 0.5
    assert any("aux" in h for h in result.report.history)  # the aux-k loss ran on the dead latents


# -- loss recovered ---------------------------------------------------------------------------
def test_loss_recovered_equals_hand_formula(tiny_lm):
    model, tok, _ = tiny_lm
    hook = "blocks.1.hook_resid_post"
    corpus = texts(40, seed=1)
    store = ActivationStore.collect(model, tok, corpus, hook, batch_size=8, progress=False)
    result = train_sae(store, TrainConfig("topk", d_sae=64, k=8, steps=150, batch_size=64, lr=3e-3), progress=False)
    sae = result.sae
    same_length = [t for t in texts(200, seed=2) if len(t.split()) == 6][:8]
    ids = tok(same_length, return_tensors="pt")["input_ids"]

    got = loss_recovered(model, ids, hook, sae)

    # three losses by hand: HF's own loss, and forward hooks on the layer itself
    layer = model.model.layers[1]
    with torch.no_grad():
        clean = float(model(ids, labels=ids).loss)
        handle = layer.register_forward_hook(lambda m, a, out: sae(out))
        with_sae = float(model(ids, labels=ids).loss)
        handle.remove()
        handle = layer.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        zero = float(model(ids, labels=ids).loss)
        handle.remove()
    assert got.clean == pytest.approx(clean, rel=1e-5)
    assert got.with_sae == pytest.approx(with_sae, rel=1e-5)
    assert got.zero_ablated == pytest.approx(zero, rel=1e-5)
    assert got.fraction == pytest.approx((zero - with_sae) / (zero - clean), rel=1e-4)
    assert math.isfinite(got.fraction) and with_sae != clean


def test_loss_recovered_ignores_padding(tiny_lm):
    model, tok, _ = tiny_lm
    corpus = texts(6, seed=4)
    batch = tokenize(tok, corpus, 32)
    identity = lambda x: x  # noqa: E731
    padded = loss_recovered(model, batch["input_ids"], "blocks.0.hook_resid_post", identity, batch["attention_mask"])
    # clean loss over the padded batch = token-weighted mean of each text's own loss
    total, count = 0.0, 0
    for t in corpus:
        ids = tok(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            total += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert padded.clean == pytest.approx(total / count, rel=1e-4)
    assert padded.with_sae == pytest.approx(padded.clean, rel=1e-5)  # identity "SAE" loses nothing
    assert padded.fraction == pytest.approx(1.0, abs=1e-4)


# -- labelling --------------------------------------------------------------------------------
def test_labels_from_synthetic_latents_are_exact():
    g = torch.Generator().manual_seed(0)
    concepts = [f"c{j}" for j in range(6)]
    tagged = torch.rand(300, 6, generator=g) < 0.3
    latents = torch.zeros(300, 10)
    latents[:, :6] = tagged * (torch.rand(300, 6, generator=g) + 0.1)  # latent j fires exactly for concept j
    latents[:, 6:] = torch.rand(300, 4, generator=g) * (torch.rand(300, 4, generator=g) < 0.5)  # noise latents
    tags = [{concepts[j] for j in range(6) if tagged[n, j]} for n in range(300)]
    table = label_table(latents, tags)
    assert table.concepts == tuple(concepts)
    assert [(r.concept, r.latent, r.precision, r.recall) for r in table.by_concept] == [(c, j, 1.0, 1.0) for j, c in enumerate(concepts)]
    assert [table.by_latent[j].concept for j in range(6)] == concepts
    sae = build_test_sae(10)
    assert apply_labels(sae, table, prefix="topic:") == {f"topic:c{j}": j for j in range(6)}
    assert sae.labels["topic:c3"] == 3


def test_precision_recall_by_hand_and_tie_breaking():
    fires = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    tagged = torch.tensor([[1], [0], [1], [0]], dtype=torch.bool)
    p, r = precision_recall(fires, tagged)
    torch.testing.assert_close(p[:, 0], torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(r[:, 0], torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64))
    # latents 0 and 2 tie exactly (same F1 and precision): the lower index wins
    table = label_table(fires[:, [0, 2]], [{"x"} if t else set() for t in tagged[:, 0].tolist()])
    assert table.by_concept[0].latent == 0


def test_token_level_labelling_on_a_model(tiny_lm):
    """Label an SAE whose latent j reads a direction; check against the activations themselves."""
    model, tok, _ = tiny_lm
    from sae_runtime.training.activations import capture

    sae = build_test_sae(4, d_in=32)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)))
    rows = []
    for t in texts(12, seed=5):
        ids = tok(t)["input_ids"]
        with torch.no_grad():
            f = sae.encode(capture(model, "blocks.0.hook_resid_post", torch.tensor([ids]))[0])
        # tag each token with "on_j" where latent j is active: the table must recover j exactly
        rows.append((ids, [{f"on_{j}" for j in range(4) if f[i, j] > 0} for i in range(len(ids))]))
    table = label_sae_on_tokens(model, sae, "blocks.0.hook_resid_post", rows, batch_size=5)
    found = {r.concept: (r.latent, r.precision, r.recall) for r in table.by_concept}
    assert len(found) >= 2, found
    assert all(found[f"on_{j}"] == (j, 1.0, 1.0) for j in range(4) if f"on_{j}" in found)
    assert sae.labels == {c: v[0] for c, v in found.items()}


def build_test_sae(d_sae: int, d_in: int = 8):
    from sae_runtime.saes import SaeConfig, build_sae

    return build_sae(SaeConfig("standard", d_in=d_in, d_sae=d_sae))


# -- command lines ----------------------------------------------------------------------------
def test_train_sae_cli(tiny_lm, tmp_path, capsys):
    from sae_runtime.train_sae import REPORT_FILE, main

    _, _, model_dir = tiny_lm
    (tmp_path / "texts.txt").write_text("\n".join(texts(60, seed=7)))
    (tmp_path / "concepts.jsonl").write_text("\n".join(
        json.dumps({"text": t, "concepts": ["has_sky"] if "sky" in t.split() else []}) for t in texts(30, seed=8)
    ))
    out = tmp_path / "sae"
    rc = main([
        "--model", str(model_dir), "--hook", "blocks.1.hook_resid_post", "--texts", str(tmp_path / "texts.txt"),
        "--arch", "topk", "--d-sae", "32", "--k", "4", "--steps", "40", "--batch-size", "64", "--out", str(out),
        "--format", "saelens", "--concepts", str(tmp_path / "concepts.jsonl"), "--eval-fraction", "0.2", "--no-progress",
    ])
    assert rc == 0
    sae = load_sae(out)
    assert isinstance(sae, TopKSae) and sae.cfg.k == 4 and sae.cfg.hook_name == "blocks.1.hook_resid_post"
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["final"]["l0"] <= 4 and report["final"]["fvu"] < report["initial"]["fvu"]
    lr = report["loss_recovered"]
    assert lr["fraction"] == pytest.approx((lr["zero_ablated"] - lr["with_sae"]) / (lr["zero_ablated"] - lr["clean"]))
    assert report["labels"] and report["labels"][0]["concept"] == "has_sky"
    assert "loss recovered" in capsys.readouterr().out


def _sky_detector(model, tok):
    """A standard SAE on the embeddings (blocks.0.hook_resid_pre) whose latent 0 fires only on "sky"."""
    emb = model.get_input_embeddings().weight.detach()
    sky = tok.convert_tokens_to_ids("sky")
    e = emb[sky]
    proj = emb @ (e / e.norm())
    others = torch.cat([proj[:sky], proj[sky + 1 :]]).max()
    sae = build_test_sae(8, d_in=emb.shape[1])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(emb.shape[1], 8, generator=g) * 5)
        sae.W_enc[:, 0] = e / e.norm()
        sae.b_enc[0] = -(proj[sky] + others) / 2  # halfway between "sky" and the closest other token
        sae.W_dec.copy_(torch.randn(8, emb.shape[1], generator=g))
    sae.cfg = sae.cfg.replace(hook_name="blocks.0.hook_resid_pre")
    pre = sae.encode(emb)[:, 0]
    assert (pre > 0).nonzero().flatten().tolist() == [sky]
    return sae


def risk_rows(n: int, seed: int):
    from sae_runtime.training.risk_data import LabelledCompletion

    rows = []
    for i, t in enumerate(texts(n, seed=seed)):
        words = t.split()
        prompt, completion = " ".join(words[:3]), " ".join(words[3:] + (["sky"] if i % 2 else []))
        rows.append(LabelledCompletion(prompt, completion, int("sky" in completion.split())))
    return rows


def test_collect_pooled_matches_single_sequence_computation(tiny_lm):
    from sae_runtime.training.activations import capture
    from sae_runtime.training.risk_data import collect_pooled, encode_pair

    model, tok, _ = tiny_lm
    sae = _sky_detector(model, tok)
    rows = risk_rows(9, seed=11)
    pooled = collect_pooled(model, tok, {"emb": sae}, rows, batch_size=4, progress=False)["emb"]
    for n, r in enumerate(rows):
        ids, n_prompt = encode_pair(tok, r.prompt, r.completion, 256)
        assert ids == tok(r.prompt)["input_ids"] + tok(r.completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lat = sae.encode(capture(model, "blocks.0.hook_resid_pre", torch.tensor([ids]))[0])
        torch.testing.assert_close(pooled.prompt_mean[n], lat[:n_prompt].mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled.prompt_max[n], lat[:n_prompt].amax(0), atol=1e-5, rtol=1e-5)
        gen = lat[n_prompt:]
        torch.testing.assert_close(pooled.gen_mean[n], gen.mean(0) if len(gen) else torch.zeros(8), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled.gen_max[n], gen.amax(0) if len(gen) else torch.zeros(8), atol=1e-5, rtol=1e-5)
        assert bool(pooled.gen_max[n, 0] > 0) == bool(r.label)


def test_train_risk_cli(tiny_lm, tmp_path, capsys):
    from sae_runtime.formats import save_native
    from sae_runtime.risk import RiskProbe
    from sae_runtime.train_risk import main

    model, tok, model_dir = tiny_lm
    sae_dir = save_native(_sky_detector(model, tok), tmp_path / "emb")
    rows = risk_rows(80, seed=12)
    data = tmp_path / "labelled.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": r.prompt, "completion": r.completion, "label": r.label}) for r in rows))
    rc = main(["--model", str(model_dir), "--sae", f"emb={sae_dir}", "--data", str(data), "--out", str(tmp_path / "probe"),
               "--l1", "0.02", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "held-out AUROC" in printed
    probe = RiskProbe.load(tmp_path / "probe")
    assert probe.layout.saes == (("emb", 8),)
    # the completion-side "sky" latent decides the label: the final head separates the held-out rows
    assert probe.meta["test_auroc_final"] >= 0.95
    assert probe.top_risk_latents(1) == [("emb", 0)]
