"""Tasks: what a campaign shows in Prefect's UI besides its logs.

Flow runs carry the campaign's name (`demo`, `demo: round 3`; flows/campaign.py, flows/rounds.py)
and the tag `campaign:NAME` (sweeps: `sweep:NAME`), so the UI's filters find them; each round
publishes the campaign's metrics table so far (artifact `NAME-rounds`, one version per round),
and the finished campaign its summary (artifact `NAME-summary`, markdown).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext


def run_tag(kind: str, name: str) -> str:
    """The Prefect tag of the runs of campaign (or sweep) `name`: `campaign:demo`."""
    return f"{kind}:{name}"


def artifact_key(name: str, what: str) -> str:
    """A Prefect artifact key for `name` (keys allow only lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{what}".lower()).strip("-")


_FLOW_RUN_TAGS: ContextVar[frozenset[str]] = ContextVar("fisao_flow_run_tags", default=frozenset())


@contextmanager
def flow_run_tags(*tags: str) -> Iterator[None]:
    """`tags` for the flow runs started inside (the round subflows, a sweep's campaigns), which
    `tag_this_flow_run` adds to each; not for their task runs.

    Prefect's own `tags` context tags every task run too, and a tagged task run asks the API for
    its tags' concurrency slots before it starts and gives them back after: two calls per task,
    which on the ephemeral server (one SQLite file, written by its event recorder at the same
    time) took up to 2 s each, about 6 s of a tiny one-round campaign's 43 s. Task runs are found
    under their flow run."""
    token = _FLOW_RUN_TAGS.set(_FLOW_RUN_TAGS.get() | set(tags))
    try:
        yield
    finally:
        _FLOW_RUN_TAGS.reset(token)


def tag_this_flow_run(*tags: str) -> None:
    """Add `tags`, and those of the enclosing `flow_run_tags`, to the running flow run."""
    ctx = FlowRunContext.get()
    assert ctx is not None and ctx.flow_run is not None, "called inside a flow run"
    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, tags=sorted({*ctx.flow_run.tags, *_FLOW_RUN_TAGS.get(), *tags}))


@task(name="publish-round")
def publish_round(campaign: str, k: int, table: list[dict]) -> str:
    """The campaign's metrics table after round `k` (a row per model: base, round 1, …) as a table
    artifact; returns its id."""
    return str(create_table_artifact(table, key=artifact_key(campaign, "rounds"),
                                     description=f"{campaign}: metrics after round {k}"))


@task(name="publish-summary")
def publish_summary(campaign: str, markdown: str) -> str:
    """The campaign's summary (markdown) as an artifact; returns its id."""
    return str(create_markdown_artifact(markdown, key=artifact_key(campaign, "summary"),
                                        description=f"{campaign}: summary"))
