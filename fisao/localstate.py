"""Where a project keeps its state, and the settings that keep every tool offline.

Prefect's home and results, the MLflow store and artifacts all live inside the project
directory (git-ignored), so two checkouts never share state and nothing needs a server.
Telemetry and update checks are off for Prefect, MLflow, DVC and the Hugging Face hub: no
machine here reaches the internet, and a tool that tries can hang.
"""
from __future__ import annotations

import os
from pathlib import Path

OFFLINE = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",  # datasets (the peers extra): never reach the hub
    "TOKENIZERS_PARALLELISM": "false",
}


def local_state_env(project: str | Path) -> dict[str, str]:
    """Environment defaults that keep Prefect and MLflow state inside `project`."""
    project = Path(project).resolve()
    return {
        **OFFLINE,
        "PREFECT_HOME": str(project / ".prefect"),
        "PREFECT_LOCAL_STORAGE_PATH": str(project / ".prefect" / "storage"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # The ephemeral API's start takes ~6 s on 2 cores, a first one that migrates a database
        # ~13 s (runner/ephemeral.py), far more when the cores are busy; Prefect's default of 20 s
        # failed `make run` on a fresh clone when it still migrated.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "FISAO_PROJECT": str(project),
    }


def apply_local_state(project: str | Path) -> None:
    """Set the defaults (variables already set win); call before importing Prefect or MLflow."""
    for key, value in local_state_env(project).items():
        os.environ.setdefault(key, value)


def use_project(project: str | Path) -> None:
    """Point MLflow at `project` (unless already pointed elsewhere) and name it for artifact paths.

    Called by every flow: a deployment's flow run starts in a worker's environment, which has a
    Prefect API but may know nothing of the project.
    """
    project = Path(project).resolve()
    os.environ["FISAO_PROJECT"] = str(project)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


def campaign_dir(project: str | Path, outputs_dir: str, name: str) -> Path:
    """Where campaign `name` keeps its own files (lock, round stages, reports, summary)."""
    return Path(project) / outputs_dir / "campaigns" / name
