import os
import stat
import subprocess
import sys

import pytest

from core.errors import EnvironmentProblem, one_line
from core.spark import check_java, parse_java_major
from pipelines.cli import main


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('java version "1.8.0_392"', 8),
        ('openjdk version "21" 2023-09-19', 21),
        ("no version here", None),
    ],
)
def test_parse_java_major(output, major):
    assert parse_java_major(output) == major


def _fake_java(tmp_path, version):
    bin_dir = tmp_path / "jdk" / "bin"
    bin_dir.mkdir(parents=True)
    java = bin_dir / "java"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2020-01-01' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return tmp_path / "jdk"


def test_old_java_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("JAVA_HOME", str(_fake_java(tmp_path, "11.0.2")))
    with pytest.raises(EnvironmentProblem) as err:
        check_java()
    assert "Java 11" in str(err.value) and "17+" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_java_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvironmentProblem, match="Java not found"):
        check_java()


def test_java_17_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("JAVA_HOME", str(_fake_java(tmp_path, "17.0.1")))
    assert check_java() == 17


def test_cli_missing_java_exits_2_with_one_line(tmp_path):
    """A fresh process whose PATH has no java and no JAVA_HOME: one line, exit 2."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "PYSPARK_GATEWAY_PORT")}
    env["PATH"] = os.path.dirname(sys.executable)
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", "generate", "--out", str(tmp_path / "g"), "--events", "10"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert err[-1].startswith("zipfline: error: Java not found")
    assert not any("Traceback" in line for line in err)


def test_cli_config_error_exits_2_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--set", "train.world_size=-1"])
    assert code == 2
    assert "train.world_size = -1" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_bad_run_date_and_stage_range(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--run-date", "2026-13-01"]) == 2
    assert "--run-date" in capsys.readouterr().err
    assert main(["run", "--from", "train", "--to", "ingest"]) == 2
    assert "comes after" in capsys.readouterr().err


def test_one_line_finds_the_worker_error():
    exc = RuntimeError(
        "An exception was thrown from the Python worker.\nTraceback:\n  File x\nValueError: bad thing\n  at org.apache"
    )
    assert one_line(exc) == "ValueError: bad thing"
    assert one_line(KeyError("k")) == "KeyError: 'k'"


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("1.5m", 90), ("10m", 600),
                                               ("1h", 3600), (" 2 H ", 7200)])  # fmt: skip
def test_budget_durations(text, seconds):
    from pipelines.cli import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "0", "-5", "ten", "5d", "1h30m"])
def test_a_bad_budget_is_a_usage_error(bad, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--budget", bad])
    assert exit_.value.code == 2 and "positive duration" in capsys.readouterr().err
