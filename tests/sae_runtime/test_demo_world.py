"""The concept world: deterministic generation, variants that do what they say, a checker that
labels hand-made cases right, concept tags, grammar, and the word-level tokenizer."""

import random
from collections import Counter

import pytest

from sae_runtime.demo import world
from sae_runtime.demo.tokenizer import SPECIAL_TOKENS, build_tokenizer


# -- generation -------------------------------------------------------------------------------
def test_generators_are_deterministic_and_seed_dependent():
    assert world.training_texts(30, seed=3) == world.training_texts(30, seed=3)
    assert world.training_texts(30, seed=3) != world.training_texts(30, seed=4)
    assert world.fact_items(24, seed=5) == world.fact_items(24, seed=5)
    assert world.fact_items(24, seed=5) != world.fact_items(24, seed=6)
    assert world.tagged_texts(10, seed=1) == world.tagged_texts(10, seed=1)


def test_every_generated_word_is_in_the_vocabulary():
    vocab = set(world.vocabulary())
    texts = world.training_texts(200, seed=0) + [it.prompt for it in world.fact_items(120, seed=0)]
    assert {w for t in texts for w in t.split()} <= vocab


def test_fact_item_mix_spans_every_uncertainty_level():
    items = world.fact_items(60, seed=2)
    assert Counter((it.variant, it.noise) for it in items) == Counter({k: 10 for k in world.DEFAULT_EVAL_MIX})
    assert all(it.prompt.endswith("answer :") for it in items)


def _context(item: world.FactItem) -> list[str]:
    return item.prompt.split()[: item.prompt.split().index("question")]


def test_intact_item_states_the_queried_fact():
    for it in world.fact_items(30, seed=7, mix=[("intact", 0.0)]):
        fact = " ".join(world.fact_sentence(it.animal, it.family, it.answer))
        assert fact in it.prompt
        assert it.supported == {it.answer}
        assert f"question : {world.QUESTIONS[it.family].format(animal=it.animal)} answer :" in it.prompt


def test_variants_change_only_what_they_promise():
    for seed in range(20):
        intact = world.fact_item(random.Random(seed), "intact")
        shuffled = world.fact_item(random.Random(seed), "shuffled")
        absent = world.fact_item(random.Random(seed), "absent")
        noise0 = world.fact_item(random.Random(seed), "noise", 0.0)
        noise1 = world.fact_item(random.Random(seed), "noise", 1.0)
        # shuffled: the same words per sentence, the question unchanged, the fact still supported
        assert Counter(_context(shuffled)) == Counter(_context(intact))
        assert shuffled.supported == {intact.answer}
        # absent: the queried fact's sentence is gone, nothing supports an answer
        assert absent.answer is None and absent.supported == frozenset()
        assert " ".join(world.fact_sentence(intact.animal, intact.family, intact.answer)) not in absent.prompt
        assert len(_context(absent)) == len(_context(intact)) - len(world.fact_sentence(intact.animal, intact.family, intact.answer))
        # noise: p = 0 changes nothing; sentence ends survive any p
        assert noise0.prompt == intact.prompt
        ctx1, ctx0 = _context(noise1), _context(intact)
        assert [i for i, w in enumerate(ctx1) if w == "."] == [i for i, w in enumerate(ctx0) if w == "."]
        assert noise1.uncertainty == 1.0 and intact.uncertainty == 0.0


# -- the checker ------------------------------------------------------------------------------
def _item(context: str, animal: str, family: str, answer: str | None = None) -> world.FactItem:
    words = context.split()
    return world.FactItem(
        prompt=world.fact_prompt(words, animal, family), animal=animal, family=family, answer=answer,
        supported=world.supported_values(words, animal, family), variant="intact",
    )  # fmt: skip


def test_supported_values_by_segment():
    assert world.supported_values("the fox is red . the cat is blue .".split(), "fox", "color") == {"red"}
    assert world.supported_values("red is fox the . the cat is blue .".split(), "fox", "color") == {"red"}
    assert world.supported_values("the cat is red . the fox lives in the river .".split(), "fox", "color") == set()
    assert world.supported_values("the fox is red green".split(), "fox", "color") == {"red", "green"}  # no final "."
    assert world.supported_values([], "fox", "color") == set()


def test_checker_on_hand_made_items():
    item = _item("the fox is red . the cat lives in the river .", "fox", "color", answer="red")
    assert world.is_correct(item, "red .") and not world.is_hallucinated(item, "red .")
    assert world.is_correct(item, "the fox is red .")
    assert world.is_hallucinated(item, "blue .") and not world.is_correct(item, "blue .")
    assert world.is_hallucinated(item, "river .")  # an attribute, but not a supported colour
    assert not world.is_hallucinated(item, "unknown .")  # abstaining is not hallucinating
    assert not world.is_hallucinated(item, "the fox .")  # states no attribute
    assert not world.is_hallucinated(item, ". blue")  # only the first sentence counts
    empty = _item("", "owl", "mood")
    assert world.is_hallucinated(empty, "happy .") and not world.is_hallucinated(empty, "unknown .")
    assert not world.is_correct(empty, "happy .")


# -- tags and grammar ---------------------------------------------------------------------------
def test_tags_mark_concepts_and_the_colour_about_to_be_said():
    t = world.tag_text("the red fox runs . the fox is red . the blue bird sings .")
    tags = dict(enumerate(t.token_tags))
    assert tags[2] == ("animal:fox",) and tags[3] == ("action:runs",)
    assert tags[1] == ()  # colour words themselves carry no tag
    assert tags[7] == ("color:red",)  # "is" before the second colour: the last colour named is red
    assert tags[10] == ("color:red",)  # "the" before "blue": still red so far
    assert tags[0] == ()  # before any colour was named
    assert t.tags == {"animal:fox", "action:runs", "animal:bird", "action:sings", "color:red"}
    themed = [s for s in world.tagged_texts(300, seed=9) if any("color:" in x for x in s.tags)]
    assert themed, "stories with repeated colours exist"


def test_well_formed_sentences():
    good = [
        "the red fox runs in the forest .", "the fox is red .", "a white owl hides .",
        "the bear sees a black cat .", "question : what colour is the fox ? answer : red .",
        "question : where does the cat live ? answer : unknown .",
    ]  # fmt: skip
    bad = ["the red red fox .", "the fox is .", "question : what colour is the fox ? answer : fox .", "fox the runs ."]
    assert all(world.is_well_formed(s) for s in good)
    assert not any(world.is_well_formed(s) for s in bad)
    assert all(world.is_well_formed(s) for st in world.tagged_texts(50, seed=4) for s in world.sentences(st.text))
    assert world.sentences("the fox is red . the cat") == ["the fox is red ."]
    assert world.words_of("the red fox sees a blue cat .", "color") == ["red", "blue"]


# -- tokenizer --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_tokenizer_round_trips_world_texts(tok):
    texts = world.training_texts(100, seed=1) + [it.prompt for it in world.fact_items(30, seed=1)]
    for t in texts:
        ids = tok(t)["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == len(t.split()) + 1
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == t
    assert len(tok) == len(SPECIAL_TOKENS) + len(world.vocabulary())
    assert tok("zebra")["input_ids"][1] == tok.unk_token_id


def test_tokenizer_saves_and_loads_through_auto_tokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "the fox is red . question : what colour is the fox ? answer :"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    batch = loaded(["the fox", "the red fox runs"], padding=True, padding_side="left", return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [loaded.pad_token_id] * 2
    assert batch["attention_mask"].sum(1).tolist() == [3, 5]
    rendered = loaded.apply_chat_template([{"role": "user", "content": "the red fox"}], tokenize=False)
    assert loaded(rendered)["input_ids"] == loaded("the red fox")["input_ids"]
