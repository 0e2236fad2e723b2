"""Test-wide settings: offline, no telemetry, and tiny shared fixtures.

Nothing here downloads: models are built in the tests with the same classes and the same
save_pretrained/from_pretrained path as the real checkpoints.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fisao import dvcdata
from fisao.localstate import OFFLINE
from fisao.world.config import CRISP

os.environ.update(OFFLINE)
# One thread: the machines have 2 cores, often shared; a second torch thread makes the tiny
# models' small matrix products ~30x slower under contention (measured by a helper session).
torch.set_num_threads(1)

# A world and models small enough to build in seconds; same code path as the demo.
TINY = {
    "world.sizes": {"train": 48, "val": 16, "test": 12},
    "world.pretrain_size": 32,
    # The crisp world with the strong train prior and the build settings it had before the demo
    # became the hard world: tiny models trained for seconds on the hard world give a verifier
    # whose hallucinated mentions score no lower than correct ones (0.405 vs 0.404), which the
    # calibration guard refuses.
    **{f"world.hardness.{k}": v for k, v in CRISP.items()},
    "world.cooccurrence": {"train": 0.95, "val": 0.3, "test": 0.3},
    "clip.target_auroc": None,
    "llava.lr": 2e-3,
    "llava.loss_mean": "token",
    # The tiny CLIP does not learn the world in 60 steps (val AUROC ~0.5): the tests check the
    # mechanics, not its quality. The calibration guard still needs correct mentions scoring above
    # hallucinated ones on average; with these LLaVA settings the tiny models give that (AUROC
    # 0.81 on 17 mentions), with the demo's (layer -1, 75% questions) they do not.
    "clip.steps": 60,
    "clip.batch_size": 16,
    "clip.vocab_size": 320,
    "llava.steps": 40,
    "llava.batch_size": 8,
    "llava.vision_feature_layer": -2,
    "llava.question_share": 0.5,
    "eval.max_new_tokens": 12,
    "eval.pope_max_new_tokens": 4,
    "eval.batch_size": 16,
    "rollout.images_per_round": 6,
    "rollout.n_per_image": 2,
    "rollout.max_new_tokens": 16,
    "reward.calibration_images": 16,
    "reward.calibration_answers": 4,
    "ppo.minibatch_size": 4,
    "ppo.rounds": 2,
}


init_project = dvcdata.init_project  # a fresh git + DVC project; the tests import it from here


@pytest.fixture(scope="session")
def tiny_models(base_project) -> dict[str, Path]:
    """The tiny world, CLIP and LLaVA of `base_project` (built once per test session); read them only."""
    from fisao.config import load_config

    models = base_project / "outputs" / "models"
    return {"world": base_project / "data" / "world", "clip": next(models.glob("clip-*")),
            "llava": next(models.glob("llava-*")), "config": load_config(None, TINY)}


@pytest.fixture(scope="session")
def real_models(tmp_path_factory) -> dict:
    """Tiny random LLaVA, LLaVA-NeXT and InstructBLIP (with their verifiers) and a COCO-layout fixture."""
    from tests.realmodels import build_all, coco_fixture

    root = tmp_path_factory.mktemp("real")
    return {"coco": coco_fixture(root / "coco"), "models": build_all(root)}


def nested(flat: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}} (TINY as a YAML config)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


@pytest.fixture(scope="session")
def base_project(tmp_path_factory) -> Path:
    """A git + DVC project with the tiny world recorded and the tiny CLIP and LLaVA built where the
    campaign flow looks for them (its tasks' own functions, without Prefect), and `tiny.yaml`.

    Copy it (`copy_project`) rather than use it: campaigns write into it.
    """
    import yaml

    from fisao.config import load_config
    from fisao.versioning import code_version
    from fisao.world.store import ensure_world
    from flows.rounds import MODEL_CODE
    from tasks.models import build_clip, build_llava
    from tasks.refs import DataRef, ModelRef, StageContext

    project = init_project(tmp_path_factory.mktemp("base") / "project")
    (project / "tiny.yaml").write_text(yaml.safe_dump({"name": "tiny", **nested(TINY)}))
    cfg = load_config(project / "tiny.yaml")
    world = ensure_world(project, cfg.data_dir, cfg.world, progress=False)
    ctx = StageContext(code=code_version(*MODEL_CODE), outputs=str(project / cfg.outputs_dir))
    data = DataRef(world.path, world.md5)
    clip = build_clip.fn(data=data, cfg=cfg.clip, ctx=ctx)
    build_llava.fn(data=data, clip=ModelRef.of(clip), cfg=cfg.llava, ctx=ctx)
    return project


class _Built(Exception):
    """Raised in place of a stage's build, carrying the directory it would build."""


def stage_dir(stage_task, **inputs) -> str:
    """The directory the stage task `stage_task` (tasks/align.py, models.py, evaluate.py) names for
    `inputs`: its key, as tasks/common.py makes it, read where the task hands it to `build_once`
    (stopped there, so nothing is built or read)."""
    import sys
    from unittest import mock

    def stop(out, marker, build):
        raise _Built(str(out))

    with mock.patch.object(sys.modules[stage_task.fn.__module__], "build_once", stop):
        try:
            stage_task.fn(**inputs)
        except _Built as e:
            return e.args[0]
    raise AssertionError(f"{stage_task.name} never called build_once")


def copy_project(base: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(base, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    """Prefect's test harness (a temporary API and database), started once for every e2e test."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("prefect-results")}):
            yield


@pytest.fixture(scope="session")
def coco_world(tmp_path_factory) -> dict[str, Path]:
    """A COCO-layout directory of renamed shapes and a tiny CLIP + LLaVA trained on it (tests/cocoworld.py)."""
    from tests.cocoworld import build_coco_world

    return build_coco_world(tmp_path_factory.mktemp("cocoworld"))


def needs_peers() -> None:
    """Skip a peers test when trl is not installed, except under `make test` (FISAO_REQUIRE_PEERS=1),
    which installs the peers extra: there a missing trl is a failure, never a silent skip."""
    if os.environ.get("FISAO_REQUIRE_PEERS"):
        import trl  # noqa: F401
    else:
        pytest.importorskip("trl", reason="the peers need trl: pip install -e '.[peers]' (make test installs it)")


def project_env(project: Path, monkeypatch) -> None:
    """Point MLflow at `project`'s store, and have whatever `cli.main.main` sets in the environment
    for `project` (its local state) undone after the test."""
    from fisao.localstate import local_state_env

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    for key in local_state_env(project):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
