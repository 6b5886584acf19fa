"""Fact-recall prompts in context layouts beyond :func:`world.fact_item`'s: for the risk probe's
training mix and for held-out tests of it.

:func:`world.fact_item` draws 1-3 facts about distinct animals and of distinct families, with
the asked fact anywhere. A layout here fixes how the context is built:

- ``one``    exactly one fact sentence; ``absent`` then asks about *another animal* in the same
             family (``the fox is red . question : what colour is the cat ?``: the README example)
- ``many``   5-7 sentences: 1-3 facts of distinct families among story-like sentences (``the owl sings .``), longer than
             any context the LM or the probe was trained on
- ``first``  2-3 facts of distinct families, the asked fact first
- ``last``   the same, the asked fact last
- ``mixed``  the probe's extra training layout (never used by the held-out eval): 1-3 facts of
             distinct families, 0-2 story-like sentences in between, and for ``absent`` half the time
             the asked fact's animal swapped for another (a same-family value about another
             animal stays in the context)

Variants are those of the world (intact, shuffled, noise, absent); for ``absent`` the asked fact
is removed and, except in ``one``, the others stay. Items are :class:`world.FactItem`, labelled
by the world's own :func:`world.supported_values`, so :func:`world.is_hallucinated` judges them.
"""

from __future__ import annotations

import random
from typing import Sequence

from sae_runtime.demo import world

HELD_OUT_LAYOUTS: tuple[str, ...] = ("one", "many", "first", "last")
LAYOUTS: tuple[str, ...] = (*HELD_OUT_LAYOUTS, "mixed")
#: Variants per held-out item, round-robin (intact twice: the mitigation's accuracy is on intact items).
HELD_OUT_MIX: tuple[tuple[str, float], ...] = (("intact", 0.0), ("shuffled", 0.0), ("noise", 0.5), ("absent", 0.0))


def _facts(rng: random.Random, n: int, distinct_families: bool) -> list[tuple[str, str, str]]:
    animals = rng.sample(world.FAMILIES["animal"], n)
    families = rng.sample(world.FACT_FAMILIES, n) if distinct_families else [rng.choice(world.FACT_FAMILIES) for _ in range(n)]
    return [(a, fam, rng.choice(world.FAMILIES[fam])) for a, fam in zip(animals, families)]


def layout_item(rng: random.Random, layout: str, variant: str, noise: float = 0.0) -> world.FactItem:
    """One fact-recall item with the given context layout and variant (see the module doc)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (use {LAYOUTS})")
    if variant not in world.VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    stories: list[list[str]] = []
    swap = False
    if layout == "one":
        facts = _facts(rng, 1, True)
        asked = 0
    elif layout == "many":
        facts = _facts(rng, rng.randint(1, 3), True)
        asked = rng.randrange(len(facts))
        stories = [_story_sentence(rng) for _ in range(rng.randint(5, 7) - len(facts))]
    elif layout in ("first", "last"):
        facts = _facts(rng, rng.randint(2, 3), True)
        asked = 0 if layout == "first" else len(facts) - 1
    else:  # mixed
        facts = _facts(rng, rng.randint(1, 3), True)
        asked = rng.randrange(len(facts))
        stories = [_story_sentence(rng) for _ in range(rng.randint(0, 2))]
        swap = variant == "absent" and rng.random() < 0.5
    animal, fam, value = facts[asked]
    if variant == "absent" and (layout == "one" or swap):  # the fact stays, the question asks about another animal
        animal = rng.choice([a for a in world.FAMILIES["animal"] if all(a != f[0] for f in facts)])
        kept = list(facts)
    else:
        kept = [f for i, f in enumerate(facts) if variant != "absent" or i != asked]
    sentences = [world.fact_sentence(*f) for f in kept]
    for st in stories:
        sentences.insert(rng.randint(0, len(sentences)), st)
    words = world.context_words(rng, sentences, variant, noise)
    return world.FactItem(
        prompt=world.fact_prompt(words, animal, fam),
        animal=animal,
        family=fam,
        answer=value if variant != "absent" else None,
        supported=world.supported_values(words, animal, fam),
        variant=variant,
        noise=noise if variant == "noise" else 0.0,
        facts=tuple(facts),
    )


def _story_sentence(rng: random.Random) -> list[str]:
    """A story-like sentence without colour, place or mood words (``the owl sings .``): it adds
    length but cannot support an answer."""
    return ["the", rng.choice(world.FAMILIES["animal"]), rng.choice(world.FAMILIES["action"]), "."]


def layout_items(n: int, seed: int, layouts: Sequence[str], mix: Sequence[tuple[str, float]] = HELD_OUT_MIX) -> list[tuple[str, world.FactItem]]:
    """``n`` (layout, item) pairs, layouts round-robin and, within each, variants round-robin."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        layout = layouts[i % len(layouts)]
        variant, noise = mix[(i // len(layouts)) % len(mix)]
        out.append((layout, layout_item(rng, layout, variant, noise)))
    return out


def probe_training_items(n: int, seed: int) -> list[world.FactItem]:
    """The risk probe's training items: half the world's default mix, half the ``mixed`` layout
    over every uncertainty level (never the held-out layouts' shapes: no 5+ fact contexts, no
    single-fact context asking about another animal)."""
    half = n // 2
    items = world.fact_items(half, seed)
    rng = random.Random(seed + 1)
    mix = world.DEFAULT_EVAL_MIX
    items += [layout_item(rng, "mixed", *mix[i % len(mix)]) for i in range(n - half)]
    random.Random(seed + 2).shuffle(items)
    return items


__all__ = ["HELD_OUT_LAYOUTS", "HELD_OUT_MIX", "LAYOUTS", "layout_item", "layout_items", "probe_training_items"]
