"""The one SparkSession factory, and the Java check that precedes it.

Under ``spark-submit`` the master and resources come from the submit command; the embedded
default is a ``local[*]`` session bound to 127.0.0.1 (docs/architecture.md, "Runtime parts").
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import EnvironmentProblem

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from core.config import SparkConfig

MIN_JAVA = 17
JAVA_HINT = (
    "install Java 17+ (Debian/Ubuntu: apt-get install openjdk-17-jre-headless; macOS: brew install "
    "openjdk@17) or set JAVA_HOME"
)
_SPARK_CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "spark"  # quiet log4j2 settings


def java_binary() -> str | None:
    """The java that Spark will use: ``$JAVA_HOME/bin/java``, else the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        if candidate.exists():
            return str(candidate)
    return shutil.which("java")


def parse_java_major(version_output: str) -> int | None:
    """Major version from ``java -version`` output (``1.8.0_x`` → 8, ``17.0.15`` → 17)."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if not match:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2):
        return int(match.group(2))
    return major


def check_java() -> int:
    """Raise :class:`EnvironmentProblem` in one line unless Java 17+ is available."""
    java = java_binary()
    if java is None:
        raise EnvironmentProblem(f"Java not found: Spark needs Java {MIN_JAVA}+; {JAVA_HINT}")
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvironmentProblem(f"cannot run {java} -version ({exc}); {JAVA_HINT}") from exc
    major = parse_java_major(proc.stderr + proc.stdout)
    if major is None or major < MIN_JAVA:
        found = f"Java {major}" if major else "an unrecognized Java"
        raise EnvironmentProblem(f"{java} is {found}; Spark needs Java {MIN_JAVA}+: {JAVA_HINT}")
    return major


def get_spark(cfg: SparkConfig) -> SparkSession:
    """The active session if there is one (``spark-submit``, tests), else a new local one."""
    # start-up speed: pyspark imports in seconds, only when a session is made
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    check_java()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if not under_spark_submit():
        # Python workers must see the same environment as the driver; Spark reads its log4j2
        # settings from SPARK_CONF_DIR (a user's own one wins).
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        if _SPARK_CONF_DIR.is_dir():
            os.environ.setdefault("SPARK_CONF_DIR", str(_SPARK_CONF_DIR))
    builder = (
        SparkSession.builder.appName(cfg.app_name)
        .config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.showConsoleProgress", str(sys.stderr.isatty()).lower())
        .config("spark.sql.session.timeZone", "UTC")
    )
    if not under_spark_submit():
        # The embedded session: everything on loopback. Under spark-submit the submit command
        # (and conf/cluster) decide the master, addresses and memory.
        builder = (
            builder.master(cfg.master)
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.driver.memory", cfg.driver_memory)
            .config("spark.ui.enabled", "false")
        )
    for key, value in cfg.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    verbose = logging.getLogger("zipfline").isEnabledFor(logging.DEBUG)
    spark.sparkContext.setLogLevel("WARN" if verbose else "FATAL")
    return spark


def under_spark_submit() -> bool:
    """True in a driver started by ``spark-submit``, whose master and resources must win."""
    return "PYSPARK_GATEWAY_PORT" in os.environ
