"""Real English text that every Python install already carries: the language reference and library topics of the
standard library's own documentation (`pydoc_data.topics`). Used for quality measurement and as haystack text, so no
dataset download is needed and nothing here was written for the tests."""

from __future__ import annotations


def english_text(min_chars: int = 0, *, skip_chars: int = 0) -> str:
    """Documentation prose from the stdlib, in a fixed order, repeated only if more is asked than exists."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name].strip() for name in sorted(topics))
    text = text[skip_chars:] if skip_chars < len(text) else text
    while len(text) < min_chars:
        text = text + "\n\n" + text
    return text
