"""Content-addressed reuse: what changes a stage's fingerprint, and what does not."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from core import atomic
from core.errors import DataError, StageError
from core.layout import RunContext
from pipelines import stages
from tests.conftest import config_for


def _fp(tmp_path: Path, name: str, *overrides: str, upstream: str | None = "u") -> str:
    ctx = RunContext(config_for(tmp_path, *overrides), "2026-11-01")
    return stages.fingerprint(ctx, stages.stage(name), upstream)


def test_same_settings_and_inputs_same_fingerprint(tmp_path):
    assert _fp(tmp_path, "train") == _fp(tmp_path, "train")


def test_own_settings_and_upstream_change_it_others_do_not(tmp_path):
    base = _fp(tmp_path, "train")
    assert _fp(tmp_path, "train", "train.lr=0.1") != base
    assert _fp(tmp_path, "train", "model.dim=8") != base
    assert _fp(tmp_path, "train", upstream="other") != base
    # another stage's settings reach train only through the upstream chain
    assert _fp(tmp_path, "train", "select.budget=3") == base
    assert _fp(tmp_path, "train", "spark.shuffle_partitions=2") == base


def test_raw_files_are_inputs(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    log = raw / "log.csv"
    log.write_text("query,label\na,x\n")
    first = _fp(tmp_path, "ingest", f"data.raw_path={raw}", upstream=None)
    assert _fp(tmp_path, "ingest", f"data.raw_path={raw}", upstream=None) == first
    log.write_text("query,label\na,x\nb,y\n")  # new rows
    second = _fp(tmp_path, "ingest", f"data.raw_path={raw}", upstream=None)
    assert second != first
    os.utime(log, ns=(1, 1))  # rewritten in place: same size, another time
    assert _fp(tmp_path, "ingest", f"data.raw_path={raw}", upstream=None) != second
    (raw / "_SUCCESS").write_text("")  # markers and hidden files are not data
    third = _fp(tmp_path, "ingest", f"data.raw_path={raw}", upstream=None)
    (raw / ".part.crc").write_text("")
    assert _fp(tmp_path, "ingest", f"data.raw_path={raw}", upstream=None) == third
    other = tmp_path / "other"
    other.mkdir()
    (other / "log.csv").write_text("query,label\na,x\nb,y\n")
    assert _fp(tmp_path, "ingest", f"data.raw_path={other}", upstream=None) != third


def test_the_label_store_is_an_input_of_dedupe_and_select(tmp_path):
    before = {n: _fp(tmp_path, n) for n in ("ingest", "dedupe", "split", "select")}
    store = tmp_path / "data" / "labels" / "import-abc"
    store.mkdir(parents=True)
    (store / "part-0.parquet").write_bytes(b"x")
    after = {n: _fp(tmp_path, n) for n in before}
    assert after["dedupe"] != before["dedupe"] and after["select"] != before["select"]
    assert after["ingest"] == before["ingest"] and after["split"] == before["split"]


def test_reuse_needs_the_marker_fingerprint(tmp_path):
    ctx = RunContext(config_for(tmp_path), "2026-11-01")
    fp = stages.fingerprint(ctx, stages.stage("dedupe"), "up")
    assert not stages.is_current(ctx, "dedupe", fp)  # never ran
    atomic.write_json(ctx.stage_dir("dedupe") / "_SUCCESS", {"fingerprint": fp, "result": {}})
    assert stages.is_current(ctx, "dedupe", fp)
    assert not stages.is_current(ctx, "dedupe", "another")
    # a marker from before fingerprints (settings_sha only) is never current
    atomic.write_json(ctx.stage_dir("dedupe") / "_SUCCESS", {"settings_sha": "x", "result": {}})
    assert not stages.is_current(ctx, "dedupe", fp)


def test_upstream_chains_through_enabled_stages(tmp_path):
    ctx = RunContext(config_for(tmp_path, "data.raw_path=/nowhere"), "2026-11-01")
    assert stages.upstream_fingerprint(ctx, "ingest") is None  # generate is off: ingest is first
    atomic.write_json(ctx.stage_dir("split") / "_SUCCESS", {"fingerprint": "s1"})
    assert stages.upstream_fingerprint(ctx, "shard") == "s1"  # augment is off by default
    assert stages.upstream_fingerprint(ctx, "train") == "missing"  # shard never finished
    with_aug = RunContext(config_for(tmp_path, "augment.enabled=true"), "2026-11-01")
    assert stages.upstream_fingerprint(with_aug, "shard") == "missing"


def test_stage_names_and_slices(tmp_path):
    cfg = config_for(tmp_path)
    names = [s.name for s in stages.select_stages(cfg, "dedupe", "shard")]
    assert names == ["dedupe", "split", "shard"]
    with pytest.raises(Exception, match="not a stage of this run"):
        stages.select_stages(cfg, "augment")


def test_where_the_data_root_lies_is_not_a_setting(tmp_path):
    a = RunContext(config_for(tmp_path), "2026-11-01")
    b = RunContext(config_for(tmp_path / "elsewhere"), "2026-11-01")
    for st in stages.STAGES:  # the label store is listed by names relative to it
        assert stages.fingerprint(a, st, "u") == stages.fingerprint(b, st, "u"), st.name


def test_a_stage_that_fails_on_a_full_disk_says_so_and_keeps_nothing(tmp_path):
    """ENOSPC anywhere in the failure's chain (Spark's Java text included) is put down to the
    disk; other failures pass through as they are, however little room is left."""
    ctx = RunContext(config_for(tmp_path), "2026-11-01")

    def full(_ctx, out):  # noqa: ANN001, ANN202
        (out / "part-0").write_bytes(b"x")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("a writer's own wrapper") from exc

    with pytest.raises(StageError, match=r"^ingest: no space left under .* MiB free\); nothing"):
        stages.run_stage(ctx, "ingest", full, upstream=None)
    assert not ctx.stage_dir("ingest").exists() and not atomic.leftovers(ctx.run_dir)

    def java(_ctx, _out):  # noqa: ANN001, ANN202
        raise RuntimeError("Py4JJavaError: ...\njava.io.IOException: No space left on device")

    with pytest.raises(StageError, match="no space left"):
        stages.run_stage(ctx, "ingest", java, upstream=None)

    def bad(_ctx, _out):  # noqa: ANN001, ANN202
        raise ValueError("not the disk")

    with pytest.raises(ValueError, match="not the disk"):
        stages.run_stage(ctx, "ingest", bad, upstream=None)
    assert stages.disk_full(DataError("no rows"), tmp_path) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_failure_on_a_nearly_full_disk_is_put_down_to_the_disk(tmp_path):
    """A writer that does not say ENOSPC (``torch.save``: "iostream error") on a disk that is
    full: a tmpfs of 2 MiB, filled."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mount refused (no CAP_SYS_ADMIN)")
    try:
        (mount / "ballast").write_bytes(b"\0" * (1 << 20))
        ctx = RunContext(config_for(tmp_path, f"data.root={mount}"), "2026-11-01")

        def iostream(_ctx, _out):  # noqa: ANN001, ANN202
            raise RuntimeError("basic_ios::clear: iostream error")

        with pytest.raises(StageError, match=r"train: no space left under .*small/2026-11-01"):
            stages.run_stage(ctx, "train", iostream, upstream=None)
        assert stages.disk_full(DataError("a data error"), mount) is None  # not the disk's
    finally:
        subprocess.run(["umount", "-l", str(mount)])
