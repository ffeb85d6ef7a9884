"""Model registry promotion: every trained model is registered; ``champion`` moves only on merit.

After a run's evaluate stage, the train stage's pyfunc model becomes a new version of
``registry.model_name``. The alias ``champion`` moves to it when there is no champion yet, or
when its ``test_error_weighted`` beats the champion's *on this run's test set* (the champion is
scored again on it, so a changed test set cannot flatter either side) by at least
``registry.margin``; otherwise the run is tagged ``promotion=rejected`` with the reason.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.config import Config, RegistryConfig
from core.errors import ConfigError
from core.layout import Champion
from pipelines.tracking import connect

CHAMPION = "champion"


@dataclass(frozen=True)
class Decision:
    accepted: bool
    version: str
    reason: str
    champion_version: str | None = None
    champion_error: float | None = None

    def tags(self) -> dict[str, str]:
        out = {
            "promotion": "accepted" if self.accepted else "rejected",
            "promotion_reason": self.reason,
            "model_version": self.version,
        }
        if self.champion_version is not None:
            out["previous_champion_version"] = self.champion_version
        return out


def decide(new_error: float, champion_error: float | None, margin: float) -> tuple[bool, str]:
    """Whether a model with ``new_error`` replaces a champion with ``champion_error``."""
    if champion_error is None:
        return True, "no champion yet"
    if new_error < champion_error - margin:
        return True, (
            f"test_error_weighted {new_error:.4f} beats the champion's {champion_error:.4f} "
            f"by more than the margin {margin:g}"
        )
    return False, (
        f"test_error_weighted {new_error:.4f} does not beat the champion's {champion_error:.4f} "
        f"on this test set by the margin {margin:g}"
    )


def promote(
    cfg: RegistryConfig,
    model_uri: str,
    new_error: float,
    score: Callable[[str], float],
    tags: dict[str, str],
) -> Decision:
    """Register ``model_uri`` and move ``champion`` to it if it earns it; ``score(uri)`` is a
    model's ``test_error_weighted`` on this run's test set."""
    # start-up speed: mlflow imports in seconds
    import mlflow
    from mlflow.exceptions import MlflowException

    from trainers.serving import quiet_pyfunc

    client = mlflow.tracking.MlflowClient()
    registry_log = logging.getLogger("mlflow.tracking._model_registry")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "registering model based on models:/m-… instead"
    try:
        with (
            quiet_pyfunc(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):  # MLflow prints "Successfully registered model" and "Created version" itself
            version = mlflow.register_model(model_uri, cfg.model_name).version
    finally:
        registry_log.setLevel(level)
    for key, value in (tags | {"test_error_weighted": f"{new_error:.6f}"}).items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    try:
        champion = client.get_model_version_by_alias(cfg.model_name, CHAMPION)
    except MlflowException:  # RESOURCE_DOES_NOT_EXIST: no champion yet
        champion = None
    champion_error = None
    if champion is not None:
        with quiet_pyfunc():
            champion_error = score(f"models:/{cfg.model_name}@{CHAMPION}")
    accepted, reason = decide(new_error, champion_error, cfg.margin)
    if accepted:
        client.set_registered_model_alias(cfg.model_name, CHAMPION, version)
    client.set_model_version_tag(
        cfg.model_name, version, "promotion", "accepted" if accepted else "rejected"
    )
    return Decision(
        accepted=accepted,
        version=str(version),
        reason=reason,
        champion_version=str(champion.version) if champion is not None else None,
        champion_error=champion_error,
    )


def fetch_champion(cfg: Config, dst: Path) -> Champion | None:
    """The registry's ``champion`` of ``registry.model_name``, its ``model.pt`` under ``dst``;
    None when there is none yet. An unreachable store is a one-line :class:`ConfigError`."""
    # start-up speed: mlflow imports in seconds
    import mlflow
    from mlflow.exceptions import MlflowException

    connect(cfg.tracking)
    name = cfg.registry.model_name
    client = mlflow.tracking.MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise ConfigError(
            f"tracking.uri = {cfg.tracking.uri}: cannot read the registry ({exc})"
        ) from exc
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version.version}", dst_path=str(dst)
            )
        )
    except Exception as exc:  # artifact store errors of every backend
        raise ConfigError(
            f"registry: cannot download {name} version {version.version} ({exc})"
        ) from exc
    found = sorted(local.rglob("model.pt"))
    if not found:
        raise ConfigError(f"registry: {name} version {version.version} holds no model.pt")
    return Champion(str(version.version), found[0])
