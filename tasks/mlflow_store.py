"""fisao's layout in MLflow's store, and read-only queries of it: no task and no Prefect here
(`fisao runs` and `fisao audit` use it; the tasks that write are tasks/tracking.py and tasks/registry.py).

Layout: one experiment per campaign name; in it one parent run (`fisao.kind = campaign`) and one
nested run per round (`fisao.kind = round`, `fisao.round = k`). A round counts only when its run
carries `fisao.complete = true` (set after its artifacts were logged and verified) and is not
deleted (`round_runs`); what a resumed campaign takes from those runs, and which runs are stale,
is decided in tasks/resume.py. Each complete round's policy is also a version of the registered
model named after the campaign (tasks/registry.py); `checkpoint_dir` resolves its `models:/` URIs
to the local checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import Run, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from fisao import io

COMPLETE = "fisao.complete"
# Marks an experiment as model training, not a GenAI app. MLflow 3.17.2's UI reads the kind from the
# address's `workflowType` instead (fisao/summary.py prints such a link); the tag is what its API
# and its experiment-kind selector record.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
INPUTS = "inputs.json"  # the parent run's recorded campaign inputs (see fisao/inputs.py)
MANIFEST = "manifest.json"
CHECKPOINT, ADAPTER = "checkpoint", "adapter"  # a round's logged model's artifact folders (tasks/registry.py)


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


# An evaluation's figures (chair_i, recall, pope_adversarial_f1, …) are logged as eval/NAME, so MLflow's
# run page charts them first and its runs table lists them together; a round's internals keep their
# own prefixes (rollout/, score/, update/, seconds/). summary.json keeps the plain names.
EVAL = "eval/"


def mlflow_key(name: str) -> str:
    """A round's metric `name` as MLflow records it: `chair_i` -> `eval/chair_i`; `update/kl` as it is."""
    return name if "/" in name else EVAL + name


def summary_key(name: str) -> str:
    """The name summary.json and the round tables use for MLflow metric `name` (`eval/chair_i` -> `chair_i`)."""
    return name.removeprefix(EVAL)


# A round's metrics at a glance (summary.json's names): `fisao runs CAMPAIGN`'s and `fisao audit`'s, and
# the columns of the experiment's saved runs view (RUNS_VIEW).
HEADLINE_METRICS = ("chair_i", "chair_s", "recall", "pope_adversarial_f1", "score/reward_mean", "update/kl")
# The saved view of a campaign's runs table in MLflow's UI (`Views` menu; the printed link opens it):
# the round runs in round order with the dataset, the logged model, `round` and HEADLINE_METRICS as
# columns. MLflow keeps saved views as experiment tags `mlflow.sharedViewState.<key>`. The runs are
# grouped by campaign: a saved view cannot expand the parent run, under which nested runs are
# folded, and a group lists its runs flat.
RUNS_VIEW = "fisao-rounds"


def runs_view_tag() -> tuple[str, str]:
    """(tag key, value) of the experiment tag that holds RUNS_VIEW, in the envelope MLflow 3.17's UI
    reads ({"name", "createdAt", "updatedAt", "state": the view's JSON})."""
    columns = ["attributes.`Dataset`", "attributes.`Models`", "params.`round`",
               *(f"metrics.`{mlflow_key(m)}`" for m in HEADLINE_METRICS)]
    state = {"searchFilter": "tags.`fisao.kind` = 'round'", "orderByKey": "attributes.start_time", "orderByAsc": True,
             "selectedColumns": columns,
             "groupBy": {"aggregateFunction": "min", "groupByKeys": [{"mode": "tag", "groupByData": "fisao.campaign"}]}}
    envelope = {"name": "fisao: rounds, headline metrics", "createdAt": 0, "updatedAt": 0, "state": json.dumps(state)}
    return f"mlflow.sharedViewState.{RUNS_VIEW}", json.dumps(envelope)


HIGHER_IS_BETTER = ("recall", "f1", "acc", "precision", "reward", "auroc")
# The metric that picks a campaign's best round (the registry's `best` alias, `fisao runs`):
# lower is better, as the summary's headline reads it.
CAMPAIGN_METRIC = mlflow_key("chair_i")


def _better(metric: str) -> int:
    return 1 if any(w in metric for w in HIGHER_IS_BETTER) else -1


def best_round(rounds: dict[int, Run], metric: str = CAMPAIGN_METRIC) -> tuple[int, float] | None:
    """(round, value) of the best FiSAO round (k > 0) by `metric`, the earlier round on a tie; None
    when no round has it."""
    scored = [(k, r.data.metrics[metric]) for k, r in rounds.items() if k > 0 and metric in r.data.metrics]
    if not scored:
        return None
    return max(scored, key=lambda kv: (_better(metric) * kv[1], -kv[0]))


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


# Registered models (tasks/registry.py writes them): `models:/NAME@ALIAS`, `models:/NAME/VERSION` or
# `models:/NAME/latest` (the highest version; MLflow reserves the alias @latest).
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+|latest))")
SHA256 = "fisao.model_sha256"  # the tag of a round's checkpoint hash, on its run, logged model and model version


def registered_name(campaign: str) -> str:
    """The campaign's model name in MLflow's registry: the campaign name with each '.' as '_'. MLflow
    refuses '.' in registered and logged model names (and '/', ':', '%', quotes, which campaign names
    never hold), while campaign names may hold it: `llava-1.5-7b` registers as `llava-1_5-7b`."""
    return campaign.replace(".", "_")


def model_version(uri: str) -> ModelVersion:
    """The registered model version that `uri` names; ValueError naming what the registry holds
    when there is no such model, alias or version."""
    match = MODEL_URI.fullmatch(uri)
    if match is None:
        raise ValueError(f"{uri!r} is not a registered model's URI: give models:/NAME@ALIAS (e.g. models:/demo@best), "
                         f"models:/NAME/VERSION (e.g. models:/demo/2) or models:/NAME/latest")
    client, name = MlflowClient(), match["name"]
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        names = sorted(m.name for m in client.search_registered_models(max_results=1000))
        raise ValueError(f"no registered model {name!r} in MLflow ({mlflow.get_tracking_uri()}); registered models: "
                         f"{', '.join(names) or 'none (a campaign registers its rounds)'}") from e
    if match["alias"] and match["alias"].lower() == "latest":
        raise ValueError(f"MLflow reserves the alias @latest: give models:/{name}/latest (its highest version, the "
                         f"campaign's last round registered) or models:/{name}@best")
    if match["alias"]:
        if match["alias"] not in model.aliases:
            aliases = ", ".join(f"@{a} (version {v})" for a, v in sorted(model.aliases.items()))
            raise ValueError(f"registered model {name!r} has no alias @{match['alias']}; its aliases: {aliases or 'none'}")
        return client.get_model_version_by_alias(name, match["alias"])
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    if match["version"] == "latest" and versions:
        return client.get_model_version(name, str(versions[-1]))
    if match["version"] not in map(str, versions):
        raise ValueError(f"registered model {name!r} has no version {match['version']}; its versions: "
                         f"{', '.join(map(str, versions)) or 'none'}")
    return client.get_model_version(name, match["version"])


def checkpoint_dir(uri: str) -> Path:
    """The local checkpoint directory (save_pretrained layout) of the registered model version `uri`:
    its logged model's `checkpoint` artifact, in place for the project's local artifact store
    (downloaded to a temporary directory from a remote one)."""
    version = model_version(uri)
    repo = get_artifact_repository(MlflowClient().get_model_version_download_uri(version.name, version.version))
    path = Path(repo.download_artifacts(CHECKPOINT))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{uri} (version {version.version} of {version.name!r}) has no checkpoint at {path}: "
                                f"its artifacts were removed; run the campaign again to log them")
    return path
