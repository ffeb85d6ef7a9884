import os
from pathlib import Path

import pytest

from core.config import Config, load_config, parse_override
from core.errors import ConfigError

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


def test_base_config_loads_with_documented_defaults():
    cfg = load_config(conf_dir=REPO_CONF)
    assert isinstance(cfg, Config)
    assert cfg.train.world_size == 2
    assert cfg.ingest.max_query_chars == 1024
    assert cfg.data.raw_path is None
    assert cfg.tracking.uri == "sqlite:///mlflow.db"
    assert cfg.spark.master == "local[*]"


def test_set_overrides_are_typed_and_nested():
    cfg = load_config(
        overrides=["train.world_size=4", "train.lr=0.25", "model.hidden=[32, 16]",
                   "data.labels=[a, b]", "data.raw_path=/logs/2026", "train.use_gpu=true"],
        conf_dir=REPO_CONF,
    )  # fmt: skip
    assert cfg.train.world_size == 4
    assert cfg.train.lr == 0.25
    assert cfg.model.hidden == (32, 16)
    assert cfg.data.labels == ("a", "b")
    assert cfg.data.raw_path == "/logs/2026"
    assert cfg.train.use_gpu is True


def test_unknown_key_names_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.wrld_size=2"], conf_dir=REPO_CONF)
    message = str(err.value)
    assert "train.wrld_size" in message and "world_size" in message


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="'nosuch'"):
        load_config(overrides=["nosuch.key=1"], conf_dir=REPO_CONF)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.world_size=two", "expected an integer"),
        ("train.world_size=0", "must be a positive number"),
        ("train.precision=fp8", "allowed: fp64, fp32, bf16, fp16"),
        ("shard.sampling=all", "allowed: unique, count, sqrt_count"),
        ("split.test_fraction=1.5", "must be in [0, 1)"),
        ("train.use_gpu=maybe", "expected true or false"),
        ("train.precision=fp16", "needs a GPU"),
        ("featurizer.char_ngram_min=3", "both 0 (off)"),
    ],
)
def test_bad_values_name_key_value_and_rule(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override], conf_dir=REPO_CONF)
    assert fragment in str(err.value)
    assert override.split("=")[0] in str(err.value)


def test_env_overlay_merges_over_base(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text("train:\n  world_size: 2\n  lr: 0.1\n")
    (tmp_path / "prod").mkdir()
    (tmp_path / "prod" / "a.yaml").write_text("train:\n  world_size: 8\n")
    cfg = load_config("prod", ["train.lr=0.3"], conf_dir=tmp_path)
    assert (cfg.train.world_size, cfg.train.lr) == (8, 0.3)
    # local may be absent; any other missing env is an error that lists the known ones
    assert load_config("local", conf_dir=tmp_path).train.world_size == 2
    with pytest.raises(ConfigError, match="known envs: prod"):
        load_config("staging", conf_dir=tmp_path)


def test_cluster_overlay_points_at_what_make_cluster_up_starts():
    from pipelines import cluster

    cfg = load_config("cluster", conf_dir=REPO_CONF)
    assert cfg.train.local_mode is False
    assert cfg.tracking.uri == f"http://{cluster.HOST}:{cluster.MLFLOW_PORT}"
    assert cfg.eval.dask_scheduler == f"tcp://{cluster.HOST}:{cluster.DASK_PORT}"


def test_every_cluster_process_binds_to_loopback(tmp_path):
    from pipelines import cluster

    started = cluster.services(tmp_path, "1g")
    assert [s.name for s in started] == [
        "spark-master", "spark-worker-1", "spark-worker-2", "dask-scheduler", "dask-worker-1",
        "dask-worker-2", "mlflow",
    ]  # fmt: skip
    for service in started:
        argv = service.argv
        assert argv[argv.index("--host") + 1] == "127.0.0.1", service.name
        # no listener left to its default address (0.0.0.0): the Dask dashboards included
        for flag in ("--dashboard-address",):
            if flag in argv:
                assert argv[argv.index(flag) + 1].startswith("127.0.0.1:"), service.name
    work = [s.argv[s.argv.index("--work-dir") + 1] for s in started if "--work-dir" in s.argv]
    assert len(set(work)) == 2 and all(w.startswith(str(tmp_path)) for w in work)
    env = cluster.environment()  # the web UIs, executors and gloo sockets follow these
    assert env["SPARK_LOCAL_IP"] == env["SPARK_MASTER_HOST"] == "127.0.0.1"
    assert (
        env["GLOO_SOCKET_IFNAME"] == "lo" and env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    )


def test_cluster_down_stops_its_process_groups_and_ignores_reused_pids(tmp_path):
    import subprocess

    from pipelines import cluster

    (tmp_path / "pids").mkdir()
    # a service whose leader started a child, as the Spark and Dask launchers do
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    (tmp_path / "pids" / "svc.pid").write_text(f"{proc.pid} {cluster._start_time(proc.pid)}")
    # a pid file whose pid now belongs to another process (another start time)
    (tmp_path / "pids" / "stale.pid").write_text(f"{os.getpid()} 1")
    assert cluster.running(tmp_path) == {"svc": proc.pid}
    cluster.down(tmp_path, quiet=True)
    assert proc.wait(timeout=5) is not None and not cluster._group_alive(proc.pid)
    assert list((tmp_path / "pids").iterdir()) == [] and cluster.running(tmp_path) == {}


def test_yaml_must_be_safe(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text("train: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(conf_dir=tmp_path)


@pytest.mark.parametrize("bad", ["train.world_size", "=3", "world_size=3"])
def test_override_syntax(bad):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override(bad)


def test_empty_override_means_null():
    assert parse_override("data.test_path=") == ("data.test_path", None)
