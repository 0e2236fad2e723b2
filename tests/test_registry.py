"""Each round's policy in MLflow's model registry, checked on a real sqlite store without Prefect's
server: logged models with the checkpoint and adapter, one version per checkpoint, the `best` and
`best` alias, and `models:/` URIs resolved to the local checkpoint."""
from __future__ import annotations

import logging

import pytest

from fisao import io
from tests.test_tracking import store  # noqa: F401  (the fixture: a fresh sqlite store)

CHAIR_I = {1: 0.30, 2: 0.20, 3: 0.25}  # round 2 is the best, round 3 the last


def log_campaign(name: str, root, chair_i: dict[int, float]) -> dict:
    """Campaign `name` with rounds `chair_i` logged complete, each with its own checkpoint under
    `root`; returns round -> the checkpoint's ref (path, sha256, adapter)."""
    from tasks.campaigns import open_campaign
    from tasks.tracking import log_round

    open_campaign.fn(name, {"data_md5": "m", "config_hash": "h", "config": {}, "resolved": {}}, {}, "lock")
    policies = {}
    for k, value in chair_i.items():
        model, adapter = root / name / f"round-{k}" / "model", root / name / f"round-{k}" / "adapter"
        io.write_json(model / "config.json", {"campaign": name, "round": k})
        io.write_json(adapter / "adapter_config.json", {"r": 4})
        policies[k] = {"path": str(model), "sha256": io.tree_digest(model), "adapter": str(adapter)}
        log_round.fn(name, name, k, {"chair_i": value, "update/kl": 0.01 * k}, {"round": k},
                     {"fisao.model_sha256": policies[k]["sha256"]}, {})
    return policies


@pytest.fixture
def campaign(tmp_path, store, monkeypatch):  # noqa: F811
    """Campaign `demo` with rounds 1-3 logged complete; returns round -> the checkpoint's ref."""
    import tasks.registry

    monkeypatch.setattr(tasks.registry, "get_run_logger", lambda: logging.getLogger("test"))
    return log_campaign("demo", tmp_path, CHAIR_I)


def register_all(policies: dict) -> dict:
    from tasks.registry import register_round

    return {k: register_round.fn("demo", k, policy) for k, policy in policies.items()}


def test_each_round_is_a_logged_model_and_a_version_and_best_follows_the_lowest_chair_i(campaign, store):  # noqa: F811
    from tasks.mlflow_store import round_runs

    registered = register_all(campaign)

    assert [registered[k]["version"] for k in (1, 2, 3)] == ["1", "2", "3"]
    assert [registered[k]["aliases"] for k in (1, 2, 3)] == [{"best": "1"}, {"best": "2"}, {"best": "2"}]
    assert store.get_registered_model("demo").aliases == {"best": 2}
    runs = round_runs("demo")
    for k in (1, 2, 3):
        version = store.get_model_version("demo", str(k))
        assert version.run_id == runs[k].info.run_id
        assert version.tags["fisao.model_sha256"] == campaign[k]["sha256"]
        (output,) = store.get_run(version.run_id).outputs.model_outputs  # the runs table's Models column
        assert output.step == k
        model = store.get_logged_model(output.model_id)
        assert (model.name, model.model_type, str(model.status)) == (f"demo-round-{k}", "fisao-policy", "READY")
        assert model.source_run_id == runs[k].info.run_id
        assert {m.key: m.value for m in model.metrics} == {"eval/chair_i": CHAIR_I[k], "update/kl": pytest.approx(0.01 * k)}
        files = {a.path for a in store.list_logged_model_artifacts(output.model_id)}
        assert files == {"checkpoint", "adapter"}


def test_a_campaign_name_with_a_dot_registers_with_an_underscore_and_a_clash_is_an_error(campaign, store, tmp_path):  # noqa: F811
    """MLflow refuses '.' in model names; the real models' configs are named llava-1.5-7b and such."""
    from tasks.mlflow_store import checkpoint_dir
    from tasks.registry import register_round

    dotted = log_campaign("llava-1.5-7b", tmp_path, {1: 0.2})
    assert register_round.fn("llava-1.5-7b", 1, dotted[1]) == {"version": "1", "aliases": {"best": "1"}}
    model = store.get_registered_model("llava-1_5-7b")
    assert model.tags["fisao.campaign"] == "llava-1.5-7b"
    (output,) = store.get_run(store.get_model_version("llava-1_5-7b", "1").run_id).outputs.model_outputs
    assert store.get_logged_model(output.model_id).name == "llava-1_5-7b-round-1"
    assert io.tree_digest(checkpoint_dir("models:/llava-1_5-7b@best")) == dotted[1]["sha256"]
    clash = log_campaign("llava-1_5-7b", tmp_path, {1: 0.3})
    with pytest.raises(ValueError, match="holds the rounds of campaign 'llava-1.5-7b'.*rename campaign 'llava-1_5-7b'"):
        register_round.fn("llava-1_5-7b", 1, clash[1])
    assert [str(v.version) for v in store.search_model_versions("name = 'llava-1_5-7b'")] == ["1"]


def test_registering_a_resumed_campaign_again_adds_no_version_and_no_model(campaign, store):  # noqa: F811
    register_all(campaign)
    models = store.search_logged_models([store.get_experiment_by_name("demo").experiment_id])

    again = register_all(campaign)

    assert [again[k]["version"] for k in (1, 2, 3)] == ["1", "2", "3"]
    assert len(store.search_model_versions("name = 'demo'")) == 3
    assert len(store.search_logged_models([store.get_experiment_by_name("demo").experiment_id])) == len(models) == 3
    assert len(store.get_metric_history(store.get_model_version("demo", "1").run_id, "eval/chair_i")) == 1
    assert len(store.get_run(store.get_model_version("demo", "1").run_id).outputs.model_outputs) == 1


def test_a_model_logged_before_a_crash_is_linked_to_its_run_when_registered_again(campaign, store, monkeypatch):  # noqa: F811
    from tasks.mlflow_store import round_runs

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed after the model was logged")

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(store.__class__, "log_outputs", crash)
        register_all({1: campaign[1]})

    register_all({1: campaign[1]})

    run = store.get_run(round_runs("demo")[1].info.run_id)
    (output,) = run.outputs.model_outputs
    assert len(store.search_logged_models([run.info.experiment_id])) == 1
    assert store.get_model_version("demo", "1").source == f"models:/{output.model_id}"


def test_a_logged_model_left_unfinished_by_a_crash_is_replaced(campaign, store):  # noqa: F811
    from tasks.mlflow_store import round_runs

    run = round_runs("demo")[1]
    pending = store.create_logged_model(run.info.experiment_id, name="demo-round-1", source_run_id=run.info.run_id,
                                        tags={"fisao.model_sha256": campaign[1]["sha256"]})

    register_all({1: campaign[1]})

    (output,) = store.get_run(run.info.run_id).outputs.model_outputs
    assert output.model_id != pending.model_id and str(store.get_logged_model(output.model_id).status) == "READY"
    with pytest.raises(Exception):
        store.get_logged_model(pending.model_id)


def test_models_uris_resolve_to_the_registered_checkpoint(campaign, store):  # noqa: F811
    from tasks.mlflow_store import checkpoint_dir

    register_all(campaign)

    best, second = checkpoint_dir("models:/demo@best"), checkpoint_dir("models:/demo/2")
    assert best == second and io.tree_digest(best) == campaign[2]["sha256"]
    assert io.tree_digest(checkpoint_dir("models:/demo/latest")) == campaign[3]["sha256"]


@pytest.mark.parametrize("uri, message", [
    ("models:/dem@best", "no registered model 'dem' in MLflow (sqlite:"),
    ("models:/dem@best", "registered models: demo"),
    ("models:/demo@bset", "registered model 'demo' has no alias @bset; its aliases: @best (version 2)"),
    ("models:/demo@latest", "MLflow reserves the alias @latest: give models:/demo/latest"),
    ("models:/demo/7", "registered model 'demo' has no version 7; its versions: 1, 2, 3"),
    ("models:/demo", "is not a registered model's URI: give models:/NAME@ALIAS"),
])
def test_a_models_uri_that_names_nothing_says_what_the_registry_holds(campaign, uri, message):
    from tasks.mlflow_store import checkpoint_dir

    register_all(campaign)

    with pytest.raises(ValueError) as e:
        checkpoint_dir(uri)
    assert message in str(e.value)


def test_the_command_line_resolves_models_uris_and_names_the_registered_models(campaign, tmp_path, capsys):
    from cli.main import main

    register_all(campaign)

    assert main(["--project", str(tmp_path), "eval", "model", "--model", "models:/nope@best"]) == 2
    assert "no registered model 'nope'" in capsys.readouterr().err
    assert main(["--project", str(tmp_path), "audit", "models:/demo@best", "--round", "3"]) == 2
    assert "models:/demo@best is round 2 of campaign 'demo' (version 2), not round 3" in capsys.readouterr().err
    assert main(["--project", str(tmp_path), "audit", "demo"]) == 2
    assert "give the round to audit" in capsys.readouterr().err
