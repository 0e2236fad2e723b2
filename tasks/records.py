"""Reading what MLflow holds about campaigns (no Prefect here: `fisao runs` and `fisao audit` use it).

Layout (written by tasks/tracking.py): one experiment per campaign name; in it one parent run
(`fisao.kind = campaign`) and one nested run per round (`fisao.kind = round`, `fisao.round = k`).
A round counts only when its run carries `fisao.complete = true` (set after its artifacts were
logged and verified) and is not deleted; runs of a round that a crash left half-logged are
deleted when the round is logged again.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from fisao import io

COMPLETE = "fisao.complete"
# Marks an experiment as model training, not a GenAI app. MLflow 3.17.2's UI reads the kind from the
# address's `workflowType` instead (flows/report.py prints such a link); the tag is what its API
# and its experiment-kind selector record.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
INPUTS = "inputs.json"  # the parent run's recorded campaign inputs (see fisao/inputs.py)
MANIFEST = "manifest.json"


def experiment_id(name: str, create: bool = True) -> str | None:
    """The experiment called `name`, created (when `create`) with its artifacts under the project's mlartifacts/."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    project = Path(os.environ.get("FISAO_PROJECT", ".")).resolve()
    return client.create_experiment(name, artifact_location=(project / "mlartifacts" / name).as_uri(),
                                    tags=EXPERIMENT_KIND)


def _query(tags: dict[str, str]) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def find_runs(experiment: str, tags: dict[str, str]) -> list[Run]:
    """Active runs of `experiment` carrying all `tags`, newest first ([] when there is no such experiment)."""
    exp = experiment_id(experiment, create=False)
    if exp is None:
        return []
    return MlflowClient().search_runs([exp], filter_string=_query(tags), max_results=1000,
                                      order_by=["attributes.start_time DESC"])


def find_run(experiment: str, tags: dict[str, str]) -> str | None:
    """The id of the newest run of `experiment` carrying all `tags`, if any."""
    runs = find_runs(experiment, tags)
    return runs[0].info.run_id if runs else None


def campaign_parent(campaign: str) -> Run | None:
    """The parent run of campaign `campaign` (its experiment has the campaign's name)."""
    runs = find_runs(campaign, {"fisao.campaign": campaign, "fisao.kind": "campaign"})
    return runs[0] if runs else None


def round_runs(campaign: str, complete_only: bool = True) -> dict[int, Run]:
    """Round index -> the newest (complete) run of that round of `campaign`."""
    tags = {"fisao.campaign": campaign, "fisao.kind": "round", **({COMPLETE: "true"} if complete_only else {})}
    out: dict[int, Run] = {}
    for run in find_runs(campaign, tags):
        out.setdefault(int(run.data.tags["fisao.round"]), run)
    return dict(sorted(out.items()))


def all_campaigns() -> list[Run]:
    """Every campaign's parent run, in every experiment, newest first."""
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not ids:
        return []
    return client.search_runs(ids, filter_string=_query({"fisao.kind": "campaign"}), max_results=1000,
                              order_by=["attributes.start_time DESC"])


def download(run_id: str, path: str, dst: str | Path) -> Path:
    """Download artifact `path` of a run into `dst`; returns the local path."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(MlflowClient().download_artifacts(run_id, path, str(dst)))


def has_artifact(run_id: str, path: str) -> bool:
    parent, _, name = path.rpartition("/")
    return any(f.path == path for f in MlflowClient().list_artifacts(run_id, parent or None))


def read_json_artifact(run_id: str, path: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return io.read_json(download(run_id, path, tmp))


def recorded_inputs(campaign: str) -> dict | None:
    """The inputs (data md5, resolved config) the campaign was started with; None for a new campaign,
    or one whose first start stopped before recording them."""
    parent = campaign_parent(campaign)
    if parent is None or not has_artifact(parent.info.run_id, INPUTS):
        return None
    return read_json_artifact(parent.info.run_id, INPUTS)


def init_store(project: str | Path) -> None:
    """Create (migrate) the MLflow store now, one process at a time: two campaigns starting together
    on a fresh project would otherwise both create its tables, and one would fail."""
    from fisao.locks import exclusive

    with exclusive(Path(project) / ".fisao-init.lock"):
        MlflowClient().search_experiments(max_results=1)
