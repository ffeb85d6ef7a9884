"""The cron entry's parts: a lock a killed run cannot leave behind, and the watermark."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipelines.retrain import (
    LOCK_FILE,
    Busy,
    log_line,
    retrain_lock,
    something_new,
    write_watermark,
)
from tests.conftest import config_for


def test_the_lock_is_exclusive_while_its_owner_lives(tmp_path):
    with retrain_lock(tmp_path) as lock:
        assert lock.took_over is None
        assert (tmp_path / LOCK_FILE).read_text() == str(os.getpid())
        with pytest.raises(Busy):
            with retrain_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_FILE).exists()  # released
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK_FILE).write_text(str(other.pid))
        with pytest.raises(Busy) as busy:
            with retrain_lock(tmp_path):
                pass
        assert busy.value.args[0] == other.pid
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(str(dead.pid))
    with retrain_lock(tmp_path) as lock:
        assert lock.took_over == dead.pid
    (tmp_path / LOCK_FILE).write_text("garbage")
    with retrain_lock(tmp_path) as lock:  # an unreadable lock is stale too
        assert lock.took_over is None


def test_the_watermark_sees_new_raw_files_and_labels(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.csv").write_text("query,label\nx,y\n")
    cfg = config_for(tmp_path, f"data.raw_path={raw}")
    root = tmp_path / "data"
    new, fp, last = something_new(cfg)
    assert new and last is None
    write_watermark(root, fp, "run-1")
    assert something_new(cfg)[0] is False  # nothing new
    (raw / "_SUCCESS").write_text("")  # markers do not count
    assert something_new(cfg)[0] is False
    (raw / "b.csv").write_text("query,label\nz,y\n")
    assert something_new(cfg)[0] is True
    write_watermark(root, something_new(cfg)[1], "run-2")
    (root / "labels").mkdir()
    (root / "labels" / "round-1.csv").write_text("query,label\nz,w\n")
    new, _, last = something_new(cfg)
    assert new and last["run_id"] == "run-2"
    log_line(root, "run-2 ok")
    assert (root / "retrain.log").read_text().strip().endswith("run-2 ok")
