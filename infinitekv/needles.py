"""Needle-in-a-haystack prompts over natural text: a fact hidden at a chosen depth of real English prose."""

from __future__ import annotations

import random
from dataclasses import dataclass

from infinitekv.corpus import english_text


@dataclass
class Needle:
    document: str
    question: str
    answer: str
    depth: float


def passkey(tokenizer, n_tokens: int, depth: float, seed: int = 0, skip_chars: int = 0) -> Needle:
    """A document of about `n_tokens` tokens of stdlib documentation with a 5-digit number hidden at `depth` (0..1).

    The needle says "magic number", not "pass key": in Python documentation "pass" and "key" are everywhere, and the
    unmodified SmolLM2 with its full cache missed a "pass key" at 5k tokens in 2 of 3 depths while it found the
    "magic number" at all 3 (measured by hand, 2026-11-22).
    """
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f"\n\nRemember this: the magic number is {key}.\n\n"
    text = english_text(n_tokens * 6, skip_chars=skip_chars)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    cut = int(len(ids) * depth)
    before = tokenizer.decode(ids[:cut])
    after = tokenizer.decode(ids[cut:])
    question = "What is the magic number mentioned in the text? Answer with the number."
    return Needle(document=before + needle + after, question=question, answer=key, depth=depth)


def two_facts(tokenizer, n_tokens: int, depths=(0.3, 0.7), seed: int = 0) -> tuple[str, list[Needle]]:
    """A document of about `n_tokens` tokens with two different facts hidden in it (a 5-digit number and a year),
    and one question for each: for asking several independent questions about one document."""
    rng = random.Random(seed)
    number, year = str(rng.randint(10000, 99999)), str(rng.randint(1100, 1899))
    facts = [
        (f"\n\nRemember this: the magic number is {number}.\n\n",
         "What is the magic number mentioned in the text? Answer with the number.", number),
        (f"\n\nRemember this: the treasure was buried in the year {year}.\n\n",
         "In which year was the treasure buried, according to the text? Answer with the year.", year),
    ]
    ids = tokenizer(english_text(n_tokens * 6), add_special_tokens=False)["input_ids"][:n_tokens]
    cuts = [0] + [int(len(ids) * d) for d in depths] + [len(ids)]
    pieces = [tokenizer.decode(ids[a:b]) for a, b in zip(cuts, cuts[1:])]
    document = pieces[0] + "".join(fact + piece for (fact, _, _), piece in zip(facts, pieces[1:]))
    return document, [Needle(document, question, answer, depth) for (_, question, answer), depth in zip(facts, depths)]
