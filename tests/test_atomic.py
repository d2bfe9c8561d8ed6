"""Atomic writes (`moedisco.io.atomic`): a reader sees the old content or the new, and no partial is left behind.

    pytest tests/test_atomic.py -q
"""

from __future__ import annotations

import pytest

from moedisco.io.atomic import partial_of, write_atomically, writing


def test_a_failed_write_keeps_the_old_content_and_leaves_no_partial(tmp_path):
    target = tmp_path / "a" / "marker.json"
    write_atomically(target, "old")
    with pytest.raises(RuntimeError), writing(target) as partial:
        partial.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["marker.json"]


def test_a_one_writer_retry_replaces_the_leftover_of_a_crash(tmp_path):
    target = tmp_path / "step_4"
    leftover = partial_of(target, shared=True)
    leftover.mkdir()
    (leftover / "model.safetensors").write_text("from a writer killed mid-copy")
    with writing(target, one_writer=True) as partial:
        partial.mkdir()
        (partial / "trainer_state.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4"]
    assert sorted(p.name for p in target.iterdir()) == ["trainer_state.json"]
