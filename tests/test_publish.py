"""What a campaign shows in Prefect's UI: tags on its flow runs and its tables as artifacts
(Prefect's test harness; a stand-in flow calls the tasks the campaign flow calls)."""
from __future__ import annotations

import json

from tasks.publish import artifact_key, run_tag


def test_artifact_keys_keep_only_what_prefect_allows():
    assert artifact_key("demo", "rounds") == "demo-rounds"
    assert artifact_key("Tiny_3.w0", "summary") == "tiny-3-w0-summary"
    assert run_tag("campaign", "Tiny_3") == "campaign:Tiny_3"


def test_a_flow_run_tags_itself_and_publishes_the_rounds_table_and_the_summary(harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.context import FlowRunContext

    from tasks.publish import publish_round, publish_summary, tag_this_flow_run

    rows = [{"model": "base", "chair_i": 0.2, "reward": None}, {"model": "round 1", "chair_i": 0.1, "reward": 0.3}]

    @flow(flow_run_name="Pub_1")
    def stand_in():
        tag_this_flow_run(run_tag("campaign", "Pub_1"))
        publish_round("Pub_1", 1, rows)
        publish_summary("Pub_1", "# Pub_1\n\nCHAIR_i 0.200 base → 0.100 best")
        return FlowRunContext.get().flow_run.id

    run_id = stand_in()

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert run.name == "Pub_1" and "campaign:Pub_1" in run.tags
    by_key = {a.key: a for a in found}
    assert set(by_key) == {"pub-1-rounds", "pub-1-summary"}
    assert by_key["pub-1-rounds"].type == "table"
    table = by_key["pub-1-rounds"].data
    assert (json.loads(table) if isinstance(table, str) else table) == rows
    assert by_key["pub-1-summary"].type == "markdown" and "0.200 base → 0.100" in by_key["pub-1-summary"].data


def test_flow_run_tags_reach_subflow_runs_and_not_task_runs(harness):
    # A tagged task run asks the API for its tags' concurrency slots before it starts: the campaign
    # tags its flow runs only (tasks/publish.py flow_run_tags).
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.context import FlowRunContext, TaskRunContext

    from tasks.publish import flow_run_tags, tag_this_flow_run

    @task
    def step() -> str:
        return str(TaskRunContext.get().task_run.id)

    @flow
    def inner() -> tuple[str, str]:
        tag_this_flow_run("round")
        return str(FlowRunContext.get().flow_run.id), step()

    @flow
    def outer() -> tuple[str, str, str, str]:
        with flow_run_tags("sweep:S"):
            with flow_run_tags("campaign:C"):
                tag_this_flow_run()
                sub, sub_task = inner()
            return str(FlowRunContext.get().flow_run.id), step(), sub, sub_task

    outer_id, outer_task, sub_id, sub_task = outer()
    with get_client(sync_client=True) as client:
        runs = {str(r.id): r for r in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[outer_id, sub_id])))}
        tasks = [client.read_task_run(t) for t in (outer_task, sub_task)]
    assert sorted(runs[outer_id].tags) == ["campaign:C", "sweep:S"]
    assert sorted(runs[sub_id].tags) == ["campaign:C", "round", "sweep:S"]
    assert [t.tags for t in tasks] == [[], []]
