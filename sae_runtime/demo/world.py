"""The concept world: a deterministic generator of tagged stories and fact-recall tasks.

Everything is a whitespace-separated string of words from a closed vocabulary (:func:`vocabulary`),
so a word-level tokenizer covers it exactly.

Stories are short sequences of template sentences over five concept families (colours, animals,
places, moods, actions). Most stories (60%) have a *colour theme*: every colour slot takes the
same colour, which gives the model a reason to carry "the current colour" along a text (that is
the representation steering clamps). Word positions are tagged with concepts (``color:red``,
``animal:fox``, ...; see :class:`TaggedText`), for feature labelling.

Fact-recall tasks follow "From Noise to Narrative": a context states facts, a question asks
about one of them, and the answer is the attribute::

    the cat lives in the river . the fox is red . question : what colour is the fox ? answer : red .

A context holds one to three facts about distinct animals and of distinct attribute families
(colour, place, mood), so recall means finding the fact the question's attribute names and
copying its value. Variants control the input uncertainty:

- ``intact``   the queried fact is stated plainly;
- ``shuffled`` the words inside each fact sentence are permuted (the fact survives as a bag);
- ``noise``    each context word except ``.`` is replaced by a random context word (never ``.`` or
  a question word, :data:`QA_WORDS`) with probability
  ``noise`` (which can erase the fact or slip in other attributes);
- ``absent``   the queried fact is removed (other facts stay; the context may end up empty).

A completion is *hallucinated* when it states an attribute that the context does not support
(:func:`is_hallucinated`). An attribute is supported when it shares a ``.``-delimited segment of
the context with the queried animal; answering ``unknown`` (or stating no attribute) is never a
hallucination. The training mix teaches copying from intact contexts and ``unknown`` for an
empty context; the other variants are never trained on.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

FAMILIES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "yellow", "white", "black"),
    "animal": ("fox", "cat", "dog", "bird", "horse", "rabbit", "bear", "owl"),
    "place": ("forest", "river", "city", "garden", "mountain", "beach"),
    "mood": ("happy", "sad", "calm", "angry", "sleepy"),
    "action": ("runs", "sleeps", "sings", "jumps", "hides", "walks"),
}
#: Families a fact (and a question) can be about, with the question asked for each.
FACT_FAMILIES: tuple[str, ...] = ("color", "place", "mood")
QUESTIONS: dict[str, str] = {
    "color": "what colour is the {animal} ?",
    "place": "where does the {animal} live ?",
    "mood": "how does the {animal} feel ?",
}
#: How a context states a fact, per family (the same sentences occur in stories).
FACT_SENTENCES: dict[str, str] = {
    "color": "the {animal} is {value} .",
    "place": "the {animal} lives in the {value} .",
    "mood": "the {animal} feels {value} .",
}
#: Story sentence templates; ``{color}`` etc. name a family slot.
STORY_TEMPLATES: tuple[str, ...] = (
    "the {color} {animal} {action} in the {place} .",
    "the {animal} is {color} .",
    "the {mood} {animal} {action} near the {place} .",
    "the {animal} lives in the {place} .",
    "the {animal} feels {mood} .",
    "a {color} {animal} {action} .",
    "the {animal} sees a {color} {animal} .",
)
UNKNOWN = "unknown"
FUNCTION_WORDS: tuple[str, ...] = (
    "the", "a", "is", "in", "near", "lives", "feels", "sees", ".", "question", ":", "what",
    "colour", "where", "does", "live", "how", "feel", "?", "answer", UNKNOWN,
)  # fmt: skip
VARIANTS: tuple[str, ...] = ("intact", "shuffled", "noise", "absent")
#: Words of the question scaffold; noise never draws them, so a noisy context cannot fake a question.
QA_WORDS: frozenset[str] = frozenset(
    {"question", ":", "what", "colour", "where", "does", "live", "how", "feel", "?", "answer", UNKNOWN}
)

_WORD_FAMILY = {w: fam for fam, words in FAMILIES.items() for w in words}
_ATTRIBUTE_WORDS = {w for fam in FACT_FAMILIES for w in FAMILIES[fam]}
_SLOT = re.compile(r"\{(\w+)\}")


def vocabulary() -> list[str]:
    """Every word the world can produce, in a fixed order (function words first)."""
    words = list(FUNCTION_WORDS)
    for fam in FAMILIES.values():
        words.extend(fam)
    return words


def family_of(word: str) -> str | None:
    """The concept family of a word (``red`` -> ``color``), or None for function words."""
    return _WORD_FAMILY.get(word)


def concept_tag(word: str) -> str | None:
    """The concept tag of a word (``red`` -> ``color:red``), or None."""
    fam = _WORD_FAMILY.get(word)
    return f"{fam}:{word}" if fam else None


@dataclass(frozen=True)
class TaggedText:
    """A text with per-word concept tags, for feature labelling.

    ``token_tags[i]`` are the tags of word ``i``: its own concept for animals, places, moods and
    actions (``animal:fox``). Colours are tagged where the model is about to say one: on a word
    followed by a colour slot, ``color:<the last colour named so far>`` (``color:red`` on the
    second ``the`` of ``the red fox runs . the red bird``). In a colour-themed story that colour
    is always the next word, and a model that follows stories must carry "say red" there: that
    is the representation colour steering clamps. ``tags`` is the set of all tags of the text.
    """

    text: str
    words: tuple[str, ...]
    token_tags: tuple[tuple[str, ...], ...]
    tags: frozenset[str]


@dataclass(frozen=True)
class FactItem:
    """One labelled fact-recall prompt.

    ``answer`` is the queried fact's value (what an intact context states, None when the fact
    was removed); ``supported`` holds the attribute words the *actual* context supports for the
    question; ``noise`` is the replacement probability of the ``noise`` variant (0 otherwise).
    """

    prompt: str
    animal: str
    family: str
    answer: str | None
    supported: frozenset[str]
    variant: str
    noise: float = 0.0
    facts: tuple[tuple[str, str, str], ...] = field(default=(), compare=False)  # (animal, family, value)

    @property
    def uncertainty(self) -> float:
        """A coarse input-uncertainty level in [0, 1] (intact 0, shuffled 0.25, noise p, absent 1)."""
        return {"intact": 0.0, "shuffled": 0.25, "noise": self.noise, "absent": 1.0}[self.variant]


# -- stories --------------------------------------------------------------------------------------
def _fill(template: str, rng: random.Random, theme: str | None, animals: Sequence[str]) -> str:
    def pick(m: re.Match) -> str:
        fam = m.group(1)
        if fam == "color" and theme is not None:
            return theme
        if fam == "animal":
            return rng.choice(animals)
        return rng.choice(FAMILIES[fam])

    return _SLOT.sub(pick, template)


def story(rng: random.Random) -> TaggedText:
    """A story of 3-6 sentences; 60% of them keep one colour throughout (a colour theme)."""
    theme = rng.choice(FAMILIES["color"]) if rng.random() < 0.6 else None
    animals = rng.sample(FAMILIES["animal"], 3)
    sentences = [_fill(rng.choice(STORY_TEMPLATES), rng, theme, animals) for _ in range(rng.randint(3, 6))]
    return tag_text(" ".join(sentences), theme=theme)


def tag_text(text: str, theme: str | None = None) -> TaggedText:
    """Tag the words of a text with concepts (see :class:`TaggedText` for the rules).

    ``theme`` is accepted for callers that know it; the tags depend on the words alone.
    """
    words = tuple(text.split())
    per_word = []
    last_colour: str | None = None
    for i, w in enumerate(words):
        fam = _WORD_FAMILY.get(w)
        tags = [f"{fam}:{w}"] if fam is not None and fam != "color" else []
        if fam == "color":
            last_colour = w
        if last_colour is not None and i + 1 < len(words) and _WORD_FAMILY.get(words[i + 1]) == "color":
            tags.append(f"color:{last_colour}")
        per_word.append(tuple(tags))
    return TaggedText(text, words, tuple(per_word), frozenset(t for ts in per_word for t in ts))


# -- fact tasks -----------------------------------------------------------------------------------
def _sample_facts(rng: random.Random, min_facts: int = 1, max_facts: int = 3) -> list[tuple[str, str, str]]:
    """``min_facts``-``max_facts`` facts (animal, family, value) about distinct animals, of
    distinct families, in context order."""
    n = rng.randint(min_facts, max_facts)
    animals = rng.sample(FAMILIES["animal"], n)
    families = rng.sample(FACT_FAMILIES, n)
    return [(a, fam, rng.choice(FAMILIES[fam])) for a, fam in zip(animals, families)]


def fact_sentence(animal: str, family: str, value: str) -> list[str]:
    """The words of a fact (``the fox is red .``)."""
    return FACT_SENTENCES[family].format(animal=animal, value=value).split()


def supported_values(context_words: Sequence[str], animal: str, family: str) -> frozenset[str]:
    """Values of ``family`` sharing a ``.``-delimited segment with ``animal`` in the context."""
    out: set[str] = set()
    segment: list[str] = []
    for w in list(context_words) + ["."]:
        if w == ".":
            if animal in segment:
                out.update(x for x in segment if _WORD_FAMILY.get(x) == family)
            segment = []
        else:
            segment.append(w)
    return frozenset(out)


def question_text(animal: str, family: str) -> str:
    return f"question : {QUESTIONS[family].format(animal=animal)} answer :"


def fact_prompt(context_words: Sequence[str], animal: str, family: str) -> str:
    """Context words, then ``question : <question> answer :``."""
    return " ".join([*context_words, question_text(animal, family)])


def context_words(rng: random.Random, sentences: list[list[str]], variant: str, noise: float = 0.0) -> list[str]:
    """A context's words from its sentences under ``variant``: ``shuffled`` permutes the words of
    each sentence (its ``.`` kept last), ``noise`` replaces each word but ``.`` by a random context
    word with probability ``noise``; other variants keep the words. Changes ``sentences`` in place."""
    if variant == "shuffled":
        for s in sentences:
            body = s[:-1]
            rng.shuffle(body)
            s[:-1] = body
    words = [w for s in sentences for w in s]
    if variant == "noise":
        vocab = [w for w in vocabulary() if w != "." and w not in QA_WORDS]
        words = [rng.choice(vocab) if w != "." and rng.random() < noise else w for w in words]
    return words


def fact_item(rng: random.Random, variant: str, noise: float = 0.0) -> FactItem:
    """One fact-recall prompt of the given variant (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    facts = _sample_facts(rng)
    animal, fam, value = rng.choice(facts)
    kept = [f for f in facts if variant != "absent" or f[:2] != (animal, fam)]
    words = context_words(rng, [fact_sentence(*f) for f in kept], variant, noise)
    return FactItem(
        prompt=fact_prompt(words, animal, fam),
        animal=animal,
        family=fam,
        answer=value if variant != "absent" else None,
        supported=supported_values(words, animal, fam),
        variant=variant,
        noise=noise if variant == "noise" else 0.0,
        facts=tuple(facts),
    )


def fact_items(n: int, seed: int, mix: Sequence[tuple[str, float]] | None = None) -> list[FactItem]:
    """``n`` labelled items drawn round-robin from ``mix`` = [(variant, noise), ...].

    The default mix spans the uncertainty levels: intact, shuffled, noise 0.25/0.5/0.75, absent.
    """
    mix = list(mix or DEFAULT_EVAL_MIX)
    rng = random.Random(seed)
    return [fact_item(rng, *mix[i % len(mix)]) for i in range(n)]


DEFAULT_EVAL_MIX: tuple[tuple[str, float], ...] = (
    ("intact", 0.0),
    ("shuffled", 0.0),
    ("noise", 0.25),
    ("noise", 0.5),
    ("noise", 0.75),
    ("absent", 0.0),
)


def training_fact_text(rng: random.Random, max_facts: int = 3) -> str:
    """A fact document for LM training: an intact context and one answered question per fact,
    in random order (``... question : what colour is the fox ? answer : red .``).

    One document in eight has an empty context and answers ``unknown``.
    """
    if rng.random() < 0.125:
        fam = rng.choice(FACT_FAMILIES)
        return f"{question_text(rng.choice(FAMILIES['animal']), fam)} {UNKNOWN} ."
    facts = _sample_facts(rng, 1, max_facts)
    words = [w for f in facts for w in fact_sentence(*f)]
    qa = [f"{question_text(a, fam)} {value} ." for a, fam, value in rng.sample(facts, len(facts))]
    return " ".join([*words, *qa])


def training_texts(n: int, seed: int, fact_fraction: float = 0.5) -> list[str]:
    """``n`` LM training documents: stories and fact documents (``fact_fraction`` of them)."""
    rng = random.Random(seed)
    return [training_fact_text(rng) if rng.random() < fact_fraction else story(rng).text for _ in range(n)]


def tagged_texts(n: int, seed: int) -> list[TaggedText]:
    """``n`` tagged stories (for feature labelling and SAE training)."""
    rng = random.Random(seed)
    return [story(rng) for _ in range(n)]


# -- checking completions -------------------------------------------------------------------------
def first_sentence(completion: str) -> list[str]:
    words = []
    for w in completion.split():
        if w == ".":
            break
        words.append(w)
    return words


def stated_answer(completion: str) -> str | None:
    """The first attribute word (colour, place or mood) or ``unknown`` the completion states."""
    for w in first_sentence(completion):
        if w in _ATTRIBUTE_WORDS or w == UNKNOWN:
            return w
    return None


def is_hallucinated(item: FactItem, completion: str) -> bool:
    """True when the completion states an attribute the item's context does not support."""
    said = stated_answer(completion)
    return said is not None and said != UNKNOWN and said not in item.supported


def is_correct(item: FactItem, completion: str) -> bool:
    """True when the completion states the queried fact's value (intact contexts)."""
    return item.answer is not None and stated_answer(completion) == item.answer


def _template_regex(template: str) -> re.Pattern:
    parts = []
    for tok in template.split():
        m = _SLOT.fullmatch(tok)
        parts.append("(?:" + "|".join(FAMILIES[m.group(1)]) + ")" if m else re.escape(tok))
    return re.compile(" ".join(parts))


_QA_PATTERN = re.compile(
    "question : (?:"
    + "|".join(_template_regex(q.replace("{animal}", "{animal}")).pattern for q in QUESTIONS.values())
    + ") answer : (?:" + "|".join(sorted(_ATTRIBUTE_WORDS)) + f"|{UNKNOWN}) ."
)
_SENTENCE_PATTERNS = [_template_regex(t) for t in STORY_TEMPLATES] + [_QA_PATTERN]


def sentences(text: str) -> list[str]:
    """Complete sentences (ending with ``.``) of a text; a trailing fragment is dropped."""
    out, cur = [], []
    for w in text.split():
        cur.append(w)
        if w == ".":
            out.append(" ".join(cur))
            cur = []
    return out


def is_well_formed(sentence: str) -> bool:
    """True when a sentence matches a story template, or is a question with its one-word answer
    (``question : what colour is the fox ? answer : red .``), exactly."""
    return any(p.fullmatch(sentence.strip()) for p in _SENTENCE_PATTERNS)


def words_of(text: str, family: str) -> list[str]:
    """The words of ``family`` in a text, in order (e.g. the colour words)."""
    return [w for w in text.split() if _WORD_FAMILY.get(w) == family]


#: Parent concepts for feature absorption: ``is:<family>`` ("is a colour word", "is an animal
#: word", ...), whose children are the family's words. Ground truth is the word itself.
PARENT_CONCEPTS: dict[str, tuple[str, ...]] = {f"is:{fam}": words for fam, words in FAMILIES.items()}


def parent_concept(word: str) -> str | None:
    """The parent concept of a word (``fox`` -> ``is:animal``), or None for function words."""
    fam = _WORD_FAMILY.get(word)
    return f"is:{fam}" if fam else None


def count_tags(texts: Iterable[TaggedText]) -> dict[str, int]:
    """How many word positions carry each tag."""
    counts: dict[str, int] = {}
    for t in texts:
        for ts in t.token_tags:
            for tag in ts:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
