"""The baselines' pictures drawn from a receipt's rows: one panel per part of the grid that ran."""

from __future__ import annotations

import pytest

from infinitekv import plots

pytest.importorskip("matplotlib")


def _cells():
    return [{"system": name, "length": length, "found": found, "tokens": length + 80, "resident_bytes": 1000 * length}
            for name, found in (("recent", False), ("infinitekv", True)) for length in (4096, 12288)]


def _quality():
    return [{"system": name, "budget": 1100, "length": 4096, "median_kl": kl}
            for name, kl in (("recent", 0.5), ("infinitekv", 0.04))]


def test_a_grid_without_tasks_draws_the_passkey_panel_alone(tmp_path):
    from PIL import Image

    (tmp_path / "both").mkdir()
    tasks = [{**cell, "kind": "sentence", "score": 0.5} for cell in _cells()]
    both = plots.draw_baselines(["recent", "infinitekv"], _cells(), tasks, _quality(), 1100,
                                tmp_path / "both" / "baselines.json")
    alone = plots.draw_baselines(["recent", "infinitekv"], _cells(), [], _quality(), 1100, tmp_path / "baselines.json")
    assert set(alone) == {"accuracy", "kl", "bytes"}
    for path in alone.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one panel instead of two: the picture is about half as wide
    assert Image.open(alone["accuracy"]).width < 0.7 * Image.open(both["accuracy"]).width
