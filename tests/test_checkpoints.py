"""Checkpoints during prefill: a read interrupted midway resumes at its last checkpoint and ends exactly where an
uninterrupted read ends; a conversation state the engine cannot read is refused with one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import tiny_model
from infinitekv.archive import Archive, never_committed
from infinitekv.attention import RetrievalConfig
from infinitekv.engine import open_session
from infinitekv.errors import IKVError

CONFIG = RetrievalConfig(hot_window=48, evict_batch=8, chunk_size=32, dense_chunk_size=32, top_k_cold=8, shortlist=32,
                         dense_up_to=200)  # the read crosses from exact attention to retrieval


class Killed(Exception):
    """Stands for kill -9 / Ctrl-C / a full disk arriving in the middle of a forward pass."""


def interrupted_read(model, ids, path, after_chunks: int, every: int, config: RetrievalConfig = CONFIG) -> None:
    with open_session(model, config=config, archive=str(path)) as session:
        session.checkpoint_every = every
        forward, calls = session._forward, []

        def dying_forward(chunk):
            if len(calls) == after_chunks:
                raise Killed()
            calls.append(1)
            return forward(chunk)

        session._forward = dying_forward
        with pytest.raises(Killed):
            session.generate(ids, max_new_tokens=6, stop_ids=set())


def test_interrupted_read_resumes_from_its_last_checkpoint_and_ends_like_an_uninterrupted_one(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(9)).tolist()[0]
    with open_session(model, config=CONFIG, mode="ram") as session:
        expected = session.generate(ids, max_new_tokens=6, stop_ids=set())

    interrupted_read(model, ids, tmp_path / "mem", after_chunks=11, every=4)  # checkpoints after chunks 4 and 8
    with Archive.open(tmp_path / "mem", writable=False) as arc:
        assert arc.committed_tokens + 48 + 8 >= 8 * 32 - 4  # the hot tier is in the state, the rest in records
        arrays, meta = arc.load_state()
    assert len(arrays["token_ids"]) == 8 * 32 and meta["pending"]["tokens"] == 600 - 8 * 32

    with open_session(model, config=CONFIG, archive=str(tmp_path / "mem"), resume=True) as session:
        assert session.pending_ids == ids[8 * 32:]
        got = session.generate(session.pending_ids, max_new_tokens=6, stop_ids=set())
        assert session.counters.prefill_tokens == 600 - 8 * 32  # only what the checkpoint did not hold is read
        session.commit()
    assert got == expected
    with Archive.open(tmp_path / "mem", writable=False) as arc:
        assert "pending" not in arc.load_state()[1]  # the finished turn leaves no interrupted read behind


def test_checkpoints_fall_on_the_ends_of_long_exact_chunks_and_the_resumed_read_ends_like_an_uninterrupted_one(
        tmp_path):
    """Reading the exact phase 128 tokens at a time, a checkpoint comes at the end of the first chunk that completes
    `every` x chunk_size tokens since the last one."""
    config = dataclasses.replace(CONFIG, dense_chunk_size=128)
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(10)).tolist()[0]
    with open_session(model, config=config, mode="ram") as session:
        expected = session.generate(ids, max_new_tokens=6, stop_ids=set())
    # chunks [0, 128) [128, 192) [192, 224) [224, 256) | killed in [256, 288): checkpoints at 128 and 256
    interrupted_read(model, ids, tmp_path / "mem", after_chunks=4, every=4, config=config)
    arrays, meta = Archive.open(tmp_path / "mem", writable=False).load_state()
    assert len(arrays["token_ids"]) == 256 and meta["pending"]["tokens"] == 600 - 256
    with open_session(model, config=config, archive=str(tmp_path / "mem"), resume=True) as session:
        assert session.generate(session.pending_ids, max_new_tokens=6, stop_ids=set()) == expected


def test_a_first_read_interrupted_before_any_checkpoint_leaves_a_directory_a_new_run_takes(tmp_path):
    model = tiny_model("llama")
    ids = list(range(1, 200))
    interrupted_read(model, ids, tmp_path / "mem", after_chunks=2, every=4)
    assert never_committed(tmp_path / "mem")
    with open_session(model, config=CONFIG, archive=str(tmp_path / "mem")) as session:  # a plain run, not --resume
        session.feed(ids)
        session.commit()
    assert not never_committed(tmp_path / "mem")


def test_resume_with_another_document_than_the_interrupted_one_is_refused(tmp_path):
    from infinitekv.engine import _turn_inputs

    model = tiny_model("llama")
    ids = list(range(1, 400))
    with open_session(model, config=CONFIG, archive=str(tmp_path / "mem")) as session:
        session.checkpoint_every = 2
        session.pending_inputs = _turn_inputs("the book", "who?")
        forward = session._forward
        session._forward = lambda chunk: (_ for _ in ()).throw(Killed()) if len(session.token_ids) >= 160 \
            else forward(chunk)
        with pytest.raises(Killed):
            session.feed(ids)
    with open_session(model, config=CONFIG, archive=str(tmp_path / "mem"), resume=True) as session:
        with pytest.raises(IKVError, match="interrupted while reading another document"):
            session.ask("who?", document="another book")


def rewrite_state(path, edit) -> None:
    """Rewrite an archive's committed state through the archive itself, so every checksum is valid."""
    with Archive.open(path) as arc:
        arrays, meta = arc.load_state()
        edit(arrays, meta)
        arc.commit(arrays, meta)


@pytest.mark.parametrize("edit, message", [
    (lambda a, m: m["config"].update(new_knob=3), "unknown setting 'new_knob'"),
    (lambda a, m: a.pop("layer1.window_v"), "missing tensor 'layer1.window_v'"),
    (lambda a, m: m.update(surprise=True), "unknown field 'surprise'"),
    (lambda a, m: m.update(transcript=7), "a malformed transcript"),
])
def test_state_with_valid_checksums_but_unknown_content_is_refused_in_one_line(tmp_path, edit, message):
    model = tiny_model("llama")
    with open_session(model, config=CONFIG, archive=str(tmp_path / "mem")) as session:
        session.feed(list(range(1, 100)))
        session.commit()
    rewrite_state(tmp_path / "mem", edit)
    with pytest.raises(IKVError, match=message):
        with open_session(model, config=CONFIG, archive=str(tmp_path / "mem"), resume=True):
            pass
