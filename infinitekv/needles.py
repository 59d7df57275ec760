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
    """A document of about `n_tokens` tokens of stdlib documentation with a 5-digit pass key at `depth` (0..1)."""
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f"\n\nRemember this: the pass key is {key}.\n\n"
    text = english_text(n_tokens * 6, skip_chars=skip_chars)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    cut = int(len(ids) * depth)
    before = tokenizer.decode(ids[:cut])
    after = tokenizer.decode(ids[cut:])
    return Needle(document=before + needle + after, question="What is the pass key mentioned in the text? Answer with the number.", answer=key, depth=depth)
