"""A task suite beside the passkey, in the spirit of RULER: facts of several kinds planted in natural text, asked
back, scored automatically. Every case is drawn from a seed (names, values, places and depths), so nobody can tune
to a fixed list; the text around the facts is the standard library's documentation (`corpus.english_text`).

Kinds:
- `keys_with_distractors`: several "special code for <name>" facts; one name is asked.
- `multi_value`: three values stated for one key at three depths; all three are asked.
- `multi_question`: two unrelated facts; both are asked in one turn.
- `sentence_fact`: a plain sentence ("the meeting of the ... will take place in <city>"); the place is asked.
- `two_step`: "<name> keeps the <colour> box"; elsewhere "the <colour> box holds number <n>"; asked: the number
  in <name>'s box.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from infinitekv.corpus import english_text

# tokens a case needs beside its document: the chat template, the planted facts, the question and the answer, so a
# case at length n fits a context of n tokens (and an 8,192-token case fits a model trained on 8,192)
ROOM = 256

KINDS = ("keys_with_distractors", "multi_value", "multi_question", "sentence_fact", "two_step")

_NAMES = ("Amara", "Bastian", "Corinne", "Dmitri", "Elif", "Farouk", "Greta", "Hiroshi", "Ingrid", "Jonas", "Keiko",
          "Lorenzo", "Maren", "Nikolai", "Odette", "Pavel", "Quentin", "Rosalind", "Soren", "Tamsin", "Ulrich",
          "Valentina", "Wendell", "Ximena", "Yusuf", "Zofia")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Montevideo", "Krakow", "Hanoi", "Reykjavik", "Valparaiso", "Tbilisi",
           "Winnipeg", "Marrakesh", "Ljubljana", "Brisbane", "Cartagena", "Helsinki", "Dakar", "Bergen", "Seville",
           "Kyoto", "Tallinn")
_GROUPS = ("harbour restoration", "river survey", "lantern festival", "orchard cooperative", "chess federation",
           "glassworks guild", "railway heritage", "beekeeping society", "observatory trust", "tidal energy")
_COLOURS = ("crimson", "amber", "teal", "violet", "ochre", "indigo", "silver", "olive", "scarlet", "cobalt")
_THINGS = ("blue notebook", "copper kettle", "wooden compass", "glass lantern", "silk scarf", "iron key",
           "paper crane", "brass telescope", "clay pot", "leather satchel")


@dataclass
class Case:
    kind: str
    document: str
    question: str
    answers: list[str]  # every one must appear in the reply
    distractors: list[str] = field(default_factory=list)  # planted values that are not the answer


def score(case: Case, reply: str) -> float:
    """Fraction of the expected values that appear in the reply (case-insensitive)."""
    text = reply.lower()
    return sum(answer.lower() in text for answer in case.answers) / len(case.answers)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _facts(kind: str, rng: random.Random) -> tuple[list[str], str, list[str], list[str]]:
    """(fact sentences in document order, question, answers, distractor values)."""
    if kind == "keys_with_distractors":
        names = rng.sample(_NAMES, 4)
        codes = [_number(rng, 7) for _ in names]
        asked = rng.randrange(len(names))
        facts = [f"The special code for {name} is {code}." for name, code in zip(names, codes)]
        question = f"What is the special code for {names[asked]}? Answer with the number."
        return facts, question, [codes[asked]], [c for i, c in enumerate(codes) if i != asked]
    if kind == "multi_value":
        key = rng.choice(_NAMES)
        values = [_number(rng, 6) for _ in range(3)]
        facts = [f"One of the secret numbers of {key} is {value}." for value in values]
        question = f"What are all the secret numbers of {key}? List every one of them."
        return facts, question, values, []
    if kind == "multi_question":
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        city, group = rng.choice(_CITIES), rng.choice(_GROUPS)
        facts = [f"{name} left the {thing} in the attic.", f"The {group} was founded in {city}."]
        rng.shuffle(facts)
        question = f"Answer both questions. What did {name} leave in the attic? In which city was the {group} founded?"
        return facts, question, [thing, city], []
    if kind == "sentence_fact":
        group, city = rng.choice(_GROUPS), rng.choice(_CITIES)
        other = rng.choice([c for c in _CITIES if c != city])
        facts = [f"The annual meeting of the {group} committee will take place in {city} this year, "
                 f"not in {other} as it did last year."]
        question = f"In which city will the annual meeting of the {group} committee take place this year?"
        return facts, question, [city], [other]
    if kind == "two_step":
        names = rng.sample(_NAMES, 2)
        colours = rng.sample(_COLOURS, 2)
        numbers = [_number(rng, 5) for _ in colours]
        facts = [f"{name} keeps the {colour} box." for name, colour in zip(names, colours)]
        facts += [f"The {colour} box holds the number {number}." for colour, number in zip(colours, numbers)]
        asked = rng.randrange(2)
        question = f"Which number is in the box that {names[asked]} keeps? Answer with the number."
        return facts, question, [numbers[asked]], [numbers[1 - asked]]
    raise ValueError(f"unknown task kind {kind!r}; choose from {', '.join(KINDS)}")


def make_case(tokenizer, kind: str, n_tokens: int, seed: int) -> Case:
    """A document of about `n_tokens` tokens with the kind's facts at random depths between 0.05 and 0.95."""
    rng = random.Random(f"{kind}-{n_tokens}-{seed}")
    facts, question, answers, distractors = _facts(kind, rng)
    skip = rng.randrange(0, 200_000)  # a different stretch of text for every case
    text = english_text(n_tokens * 6 + skip, skip_chars=skip)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    cuts = sorted(int(len(ids) * rng.uniform(0.05, 0.95)) for _ in facts)
    pieces, previous = [], 0
    for cut, fact in zip(cuts, facts):
        pieces.append(tokenizer.decode(ids[previous:cut]))
        pieces.append(f"\n\n{fact}\n\n")
        previous = cut
    pieces.append(tokenizer.decode(ids[previous:]))
    return Case(kind=kind, document="".join(pieces), question=question, answers=answers, distractors=distractors)
