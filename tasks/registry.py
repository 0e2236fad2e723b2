"""Tasks: each round's policy as an MLflow logged model, registered under the campaign's name.

A FiSAO round's policy is a merged checkpoint (save_pretrained layout) and the LoRA adapter it was
merged from. Each complete round run gets one MLflow 3 logged model (model type `fisao-policy`,
named `CAMPAIGN-round-K`, artifacts `checkpoint/` and `adapter/`) that is the run's output (the
runs table's Models column) and carries the run's metrics of that round; and one version of the
registered model named after the campaign (`demo` version 1 = round 1, …; a '.' in the campaign's
name becomes '_', which MLflow's model names need: `tasks.mlflow_store.registered_name`). The alias `best` points
at the best round by the campaign's metric (`CAMPAIGN_METRIC`: the lowest CHAIR_i, the earlier round
on a tie, as `fisao runs` and the summary's headline pick it). MLflow reserves the alias `latest`:
`models:/demo/latest` is its name for the highest version, the last round registered. The base
model (round 0) is no version: it is the campaign's starting point, logged by its build run.

Logged once: a round's logged model and its version carry the checkpoint's sha256
(`fisao.model_sha256`) and are looked up by it before anything is created, so a resumed campaign,
or one whose process died between logging a round and registering it, registers each checkpoint
once. A logged model that a crash left unfinished (status PENDING) is deleted and logged again
(tasks/resume.py: `drop_unfinished_models`); a round is registered only from its complete run of
that checkpoint (`logged_round`, RoundNotLogged otherwise).
"""
from __future__ import annotations

from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task

from tasks.mlflow_store import ADAPTER, CAMPAIGN_METRIC, CHECKPOINT, SHA256, best_round, registered_name, round_runs
from tasks.resume import drop_unfinished_models, logged_round

POLICY = "fisao-policy"  # the logged models' model type


def _filter(tags: dict[str, str]) -> str:
    return " AND ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def logged_policy(client: MlflowClient, campaign: str, k: int, run: Run, policy: dict) -> str:
    """The id of the logged model of round `k`'s checkpoint `policy` ({"path", "sha256", "adapter"}),
    logged from round run `run` unless a finished one exists, and linked to the run (each once)."""
    sha, log = policy["sha256"], get_run_logger()
    found = client.search_logged_models([run.info.experiment_id], filter_string=_filter({SHA256: sha}))
    ready = [m.model_id for m in found if m.status == LoggedModelStatus.READY and m.source_run_id == run.info.run_id]
    if ready:
        model_id = ready[0]
    else:
        drop_unfinished_models(client, found, campaign, k)
        model_id = client.create_logged_model(run.info.experiment_id, name=f"{registered_name(campaign)}-round-{k}",
                                              source_run_id=run.info.run_id, model_type=POLICY,
                                              tags={SHA256: sha, "fisao.campaign": campaign, "fisao.round": str(k)},
                                              params=dict(run.data.params)).model_id
        client.log_model_artifacts(model_id, policy["path"], CHECKPOINT)
        client.log_model_artifacts(model_id, policy["adapter"], ADAPTER)
        client.finalize_logged_model(model_id, LoggedModelStatus.READY)
        log.info("logged round %d of %s as model %s", k, campaign, model_id)
    if model_id not in {o.model_id for o in run.outputs.model_outputs}:
        # The round's metrics on the model (MLflow links a metric to a model by its model_id; the run
        # keeps one copy of each point), then the model as the run's output (the Models column).
        client.log_batch(run.info.run_id, metrics=[
            Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id)
            for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key) if m.step == k])
        client.log_outputs(run.info.run_id, [LoggedModelOutput(model_id, step=k)])
    return model_id


def _registered_model(client: MlflowClient, campaign: str) -> str:
    """The name of campaign `campaign`'s registered model, created unless it exists; a ValueError if
    that name is taken by another campaign's (`a.b` and `a_b` share the name `a_b`)."""
    name = registered_name(campaign)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"fisao.campaign": campaign},
                                       description=f"FiSAO policies of campaign {campaign}: a version per round; "
                                                   f"models:/{name}@best has the lowest {CAMPAIGN_METRIC}, "
                                                   f"models:/{name}/latest is the last round")
        return name
    owner = model.tags.get("fisao.campaign")
    if owner != campaign:
        raise ValueError(f"registered model {name!r} holds the rounds of campaign {owner!r}, not of {campaign!r} "
                         f"(MLflow model names cannot hold '.', so both map to {name!r}): rename campaign {campaign!r}")
    return name


def register_version(client: MlflowClient, campaign: str, k: int, run: Run, model_id: str, sha256: str) -> str:
    """The version of campaign `campaign`'s registered model that holds checkpoint `sha256`, created
    from logged model `model_id` unless one exists; returns its number."""
    name = _registered_model(client, campaign)
    existing = client.search_model_versions(f"name = '{name}' AND {_filter({SHA256: sha256})}")
    if existing:
        return str(existing[0].version)
    version = client.create_model_version(name, f"models:/{model_id}", run_id=run.info.run_id, model_id=model_id,
                                          tags={SHA256: sha256, "fisao.round": str(k)},
                                          description=f"round {k} of campaign {campaign}")
    get_run_logger().info("registered round %d of %s as models:/%s/%s", k, campaign, name, version.version)
    return str(version.version)


def set_best(client: MlflowClient, campaign: str, metric: str = CAMPAIGN_METRIC) -> dict[str, str]:
    """Point alias `best` at the version of the campaign's best complete round by `metric` (rounds whose
    checkpoint has no version yet are left out); returns {"best": version} ({} before any round)."""
    name = registered_name(campaign)
    versions = {v.tags.get(SHA256): str(v.version) for v in client.search_model_versions(f"name = '{name}'")}
    runs = {k: r for k, r in round_runs(campaign).items() if k > 0 and r.data.tags.get(SHA256) in versions}
    best = best_round(runs, metric)
    if best is None:
        return {}
    version = versions[runs[best[0]].data.tags[SHA256]]
    client.set_registered_model_alias(name, "best", version)
    return {"best": version}


@task(name="register-round")
def register_round(campaign: str, k: int, policy: dict) -> dict:
    """Round `k`'s checkpoint `policy` ({"path", "sha256", "adapter"}) as a logged model of its complete
    round run and a version of registered model `campaign` (each once), then the aliases; returns
    {"version": its version, "aliases": {"best": version}}. RoundNotLogged when MLflow holds no
    complete run of round `k` with that checkpoint."""
    client, run = MlflowClient(), logged_round(campaign, k, policy["sha256"])
    model_id = logged_policy(client, campaign, k, run, policy)
    version = register_version(client, campaign, k, run, model_id, policy["sha256"])
    return {"version": version, "aliases": set_best(client, campaign)}
