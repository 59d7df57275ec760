"""The task suite's cases: drawn from a seed, facts planted in natural text at the asked length, scored by content."""

from __future__ import annotations

import pytest

from infinitekv.tasks import KINDS, ROOM, Case, make_case, score

pytestmark = pytest.mark.smollm2


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_plants_its_answers_in_a_document_of_the_asked_length(smollm2, kind):
    case = make_case(smollm2.tokenizer, kind, 2000, seed=3)
    tokens = len(smollm2.tokenizer(case.document, add_special_tokens=False)["input_ids"])
    assert 2000 <= tokens < 2000 + 120  # the text plus the planted sentences
    for answer in case.answers:
        assert answer in case.document
    assert score(case, " ".join(case.answers)) == 1.0
    assert score(case, " ".join(case.distractors)) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_a_case_at_a_length_fits_that_context_with_its_question_and_answer(smollm2, kind):
    length, answer_tokens = 2048, 48  # bench_tasks asks for 48 new tokens
    case = make_case(smollm2.tokenizer, kind, length - ROOM, seed=5)
    messages = [{"role": "user", "content": case.document + "\n\n" + case.question}]
    prompt = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert len(prompt["input_ids"]) + answer_tokens <= length


def test_cases_are_drawn_from_the_seed(smollm2):
    first = make_case(smollm2.tokenizer, "keys_with_distractors", 1500, seed=1)
    again = make_case(smollm2.tokenizer, "keys_with_distractors", 1500, seed=1)
    other = make_case(smollm2.tokenizer, "keys_with_distractors", 1500, seed=2)
    assert first == again
    assert (first.question, first.answers) != (other.question, other.answers)
    assert first.document[:200] != other.document[:200]  # a different stretch of text too


def test_score_counts_each_expected_value_once_case_insensitively():
    case = Case(kind="multi_value", document="", question="", answers=["Lisbon", "42", "Oslo"])
    assert score(case, "lisbon and 42") == pytest.approx(2 / 3)
    assert score(case, "") == 0.0


def test_an_unknown_kind_is_refused_with_the_choices(smollm2):
    with pytest.raises(ValueError, match="sentence_fact"):
        make_case(smollm2.tokenizer, "riddle", 1000, seed=0)
