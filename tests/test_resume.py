"""What a resumed campaign takes as finished, what is stale and what it redoes (tasks/resume.py),
checked on a real MLflow sqlite store without Prefect's server; each named error says the round
and the fix. The tasks are called through `.fn`, as in tests/test_tracking.py."""
from __future__ import annotations

import pytest

from fisao import io
from tests.test_tracking import store  # noqa: F401  (the fixture: a fresh sqlite store)


def open_demo(name: str = "demo") -> str:
    from tasks.campaigns import open_campaign

    inputs = {"data_md5": "m", "config_hash": "h", "config": {}, "resolved": {"ppo": {"rounds": 3}}}
    return open_campaign.fn(name, inputs, {}, "lock")["run_id"]


def trained_round(root, k: int, parent_sha256: str, tagged_sha256: str | None = None) -> dict:
    """Round k of `demo` as flows/rounds.py records it: an update stage directory with the merged
    checkpoint and the adapter, their manifest, and a complete MLflow run tagged with the checkpoint's
    sha256 (or `tagged_sha256`); returns the checkpoint's ref."""
    from tasks.resume import write_manifest
    from tasks.tracking import log_round

    stage = root / f"update-{k}"
    model, adapter = stage / "model", stage / "adapter"
    io.write_json(model / "config.json", {"round": k})
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    io.write_json(adapter / "adapter_config.json", {"r": 4})
    manifest = write_manifest.fn({"model": [str(model), str(stage)], "adapter": [str(adapter), str(stage)]},
                                 str(root / f"manifest-{k}.json"))
    policy = {"path": str(model.resolve()), "sha256": io.tree_digest(model), "adapter": str(adapter.resolve())}
    tags = {"fisao.parent_sha256": parent_sha256, "fisao.model_sha256": tagged_sha256 or policy["sha256"]}
    log_round.fn("demo", "demo", k, {"chair_i": 0.1 * k}, {}, tags, {"adapter": str(adapter)}, manifest)
    return policy


def test_an_intact_round_is_taken_with_its_checkpoint_and_metrics_only_after_the_same_parent(tmp_path, store):  # noqa: F811
    from tasks.resume import rounds_done, take_round, verify_finished_rounds

    open_demo()
    policy = trained_round(tmp_path, 1, "base-sha")

    finished = verify_finished_rounds.fn("demo")

    assert finished["1"]["ok"] and finished["1"]["policy"] == policy
    assert finished["1"]["metrics"] == {"chair_i": pytest.approx(0.1)}  # summary.json's name, not eval/chair_i
    assert rounds_done(finished) == 1
    assert take_round(finished, 1, "base-sha") is finished["1"]
    assert take_round(finished, 1, "another-base") is None  # trained from another checkpoint: run again
    assert take_round(finished, 2, policy["sha256"]) is None  # never finished


def test_rounds_done_stops_at_the_first_round_missing():
    from tasks.resume import rounds_done

    assert rounds_done({}) == 0
    assert rounds_done({"1": {"ok": True}, "2": {"ok": False}, "4": {"ok": True}}) == 2


def test_a_damaged_round_is_reported_its_stage_directory_removed_and_it_is_redone(tmp_path, store, caplog):  # noqa: F811
    from tasks.resume import take_round, verify_finished_rounds

    open_demo()
    trained_round(tmp_path, 1, "base-sha")
    weights = tmp_path / "update-1" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    finished = verify_finished_rounds.fn("demo")

    assert finished["1"]["ok"] is False and "policy" not in finished["1"]
    assert f"{weights.resolve()}: truncated (100 of 2048 bytes)" in caplog.text
    assert not (tmp_path / "update-1").exists()  # the whole stage goes, so the update runs again
    assert take_round(finished, 1, "base-sha") is None
    assert f"removed {(tmp_path / 'update-1').resolve()} (it is rebuilt from its inputs)" in caplog.text


def test_a_manifest_naming_another_checkpoint_than_its_run_is_a_resume_mismatch(tmp_path, store):  # noqa: F811
    from tasks.mlflow_store import round_runs
    from tasks.resume import ManifestDisagrees, ResumeMismatch, verify_finished_rounds

    open_demo()
    policy = trained_round(tmp_path, 1, "base-sha", tagged_sha256="0" * 64)
    run_id = round_runs("demo")[1].info.run_id

    with pytest.raises(ManifestDisagrees) as e:
        verify_finished_rounds.fn("demo")

    assert isinstance(e.value, ResumeMismatch) and isinstance(e.value, ValueError)
    assert (e.value.campaign, e.value.round) == ("demo", 1)
    message = str(e.value)
    assert message.startswith("round 1 of campaign 'demo': ")
    assert "0" * 64 in message and policy["sha256"] in message  # what disagrees: both checkpoints
    assert f"`mlflow runs delete --run-id {run_id}`" in message and "resume the campaign" in message  # the fix


def test_resuming_an_unknown_campaign_names_it_and_how_to_start_it(tmp_path, store, capsys):  # noqa: F811
    from cli.main import main
    from tasks.resume import UnknownCampaign, recorded_campaign

    with pytest.raises(UnknownCampaign) as e:
        recorded_campaign("ghost")

    assert e.value.round is None
    assert str(e.value).startswith(f"campaign 'ghost': MLflow (sqlite:///{tmp_path / 'mlflow.db'}) holds no such")
    assert "`fisao run --config CONFIG --run-name ghost`" in str(e.value) and "`fisao runs`" in str(e.value)
    # `fisao resume ghost` ends with that one line and exit status 2, before Prefect starts.
    assert main(["--project", str(tmp_path), "resume", "ghost"]) == 2
    assert capsys.readouterr().err == f"fisao: error: {e.value}\n"


def test_resume_runs_the_recorded_config_to_the_last_round_target(store):  # noqa: F811
    from tasks.campaigns import campaign_state
    from tasks.resume import recorded_campaign

    parent = open_demo()
    assert recorded_campaign("demo") == {"config": {"ppo": {"rounds": 3}}, "target_rounds": 3}  # ppo.rounds

    campaign_state.fn(parent, {"fisao.target_rounds": "5"})  # `--rounds 5` extended it
    assert recorded_campaign("demo")["target_rounds"] == 5


def test_registering_a_round_without_its_complete_run_is_a_resume_mismatch(tmp_path, store):  # noqa: F811
    from tasks.registry import register_round
    from tasks.resume import RoundNotLogged

    open_demo()
    policy = trained_round(tmp_path, 1, "base-sha")

    with pytest.raises(RoundNotLogged) as e:
        register_round.fn("demo", 2, policy)
    assert str(e.value).startswith("round 2 of campaign 'demo': MLflow holds no complete run of it")
    assert "`fisao resume demo`" in str(e.value)

    other = {**policy, "sha256": "f" * 64}
    with pytest.raises(RoundNotLogged) as e:
        register_round.fn("demo", 1, other)
    assert e.value.round == 1 and f"trained checkpoint sha256 {policy['sha256']}" in str(e.value)
    assert f"its checkpoint sha256 {'f' * 64} cannot be registered" in str(e.value)


def test_a_name_started_with_other_inputs_is_one_resume_mismatch_and_one_line_of_the_cli(tmp_path, store, capsys,  # noqa: F811
                                                                                      monkeypatch):
    """A campaign resumed on other data (InputsChanged) and a sweep name reused with another config
    (SweepChanged) are both caught as ResumeMismatch; the CLI prints the first line of either as its
    `fisao: error:` line, saying what differs and what to do."""
    import cli.campaigns
    from cli.main import main
    from fisao.localstate import local_state_env
    from tasks.campaigns import InputsChanged, open_campaign
    from tasks.resume import ResumeMismatch
    from tasks.sweeps import SweepChanged, open_sweep

    open_demo()
    changed = {"data_md5": "m2", "config_hash": "h", "config": {}, "resolved": {"ppo": {"rounds": 3}}}
    with pytest.raises(ResumeMismatch) as campaign:
        open_campaign.fn("demo", changed, {}, "lock")
    open_sweep.fn("q1", "h1", {}, {})
    with pytest.raises(ResumeMismatch) as sweep:
        open_sweep.fn("q1", "h2", {}, {})

    assert isinstance(campaign.value, InputsChanged) and isinstance(sweep.value, SweepChanged)
    assert (campaign.value.campaign, campaign.value.round, sweep.value.campaign) == ("demo", None, "q1")
    first, *changes = str(campaign.value).splitlines()
    assert first.startswith("campaign 'demo': it was started with other inputs (MLflow run ")
    assert "--run-name" in first and "--allow-changed-data" in first and first.endswith("What changed:")
    assert changes == ["  data: md5 m -> m2 (data.dvc)"]
    message = str(sweep.value)
    assert "\n" not in message and message.startswith("sweep 'q1': it was started with another config (MLflow run ")
    assert "config hash h1, now h2" in message and message.endswith("Give this one a new --name")

    for key, value in local_state_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    for error in (campaign.value, sweep.value):
        def fails(args, error=error):
            raise error

        monkeypatch.setattr(cli.campaigns, "_resume", fails)
        assert main(["--project", str(tmp_path), "resume", "demo"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[0] == f"fisao: error: {str(error).splitlines()[0]}"


def test_tagging_a_campaign_mlflow_lost_is_a_resume_mismatch(store):  # noqa: F811
    from tasks.resume import CampaignNotLogged
    from tasks.sweeps import tag_campaign

    with pytest.raises(CampaignNotLogged) as e:
        tag_campaign.fn("ghost", {"fisao.sweep": "q1"})

    assert str(e.value).startswith("campaign 'ghost': MLflow (sqlite:///")
    assert "`fisao run --run-name ghost`" in str(e.value)


def test_stale_runs_of_a_round_are_deleted_and_its_complete_run_is_kept(tmp_path, store):  # noqa: F811
    from tasks.mlflow_store import COMPLETE, find_runs
    from tasks.resume import round_key
    from tasks.tracking import log_round, new_run

    parent = open_demo()
    first = log_round.fn("demo", "demo", 1, {"chair_i": 0.3}, {}, {"fisao.model_sha256": "a" * 64}, {})
    crashed = new_run("demo", "round-1", {"fisao.key": round_key("demo", 1), "fisao.kind": "round", COMPLETE: "false",
                                          "mlflow.parentRunId": parent})

    # The round recomputed after the crash came out as another checkpoint: both older runs go.
    second = log_round.fn("demo", "demo", 1, {"chair_i": 0.2}, {}, {"fisao.model_sha256": "b" * 64}, {})
    assert second not in (first, crashed)
    assert {store.get_run(r).info.lifecycle_stage for r in (first, crashed)} == {"deleted"}

    # Logged again with the same checkpoint: the complete run is kept, nothing is logged twice.
    assert log_round.fn("demo", "demo", 1, {"chair_i": 0.2}, {}, {"fisao.model_sha256": "b" * 64}, {}) == second
    assert [r.info.run_id for r in find_runs("demo", {"fisao.key": round_key("demo", 1)})] == [second]
