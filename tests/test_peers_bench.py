"""End to end: bench/peers.py for one round and one seed on the tiny world, with the real Prefect
(test harness), MLflow and DVC.

The mechanics, not the figures: peers.json has the issue's shape with finite numbers; the four
methods' round 0 is one evaluation of one base model; the answers and rewards TRL's GRPO trained
on and the pairs CSR's DPO trained on are the ones their round directories hold, on the images of
FiSAO's round; each peer is a campaign in MLflow with FiSAO's metric names and a `round` param;
peers.png is a PNG; the JSON is the last line of stdout. Run again, it trains and logs nothing twice.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from tests.conftest import copy_project, needs_peers, project_env

pytestmark = pytest.mark.e2e
needs_peers()

ROOT = Path(__file__).resolve().parents[1]
CURVES = ("chair_s", "chair_i", "recall", "pope_adversarial_f1")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_peers_bench_one_round_one_seed(base_project, tmp_path_factory, harness, monkeypatch, capsys):
    from fisao.align.sample import round_examples
    from fisao.config import load_config
    from fisao.peers import csr, grpo
    from fisao.peers.compare import METHODS

    project = copy_project(base_project, tmp_path_factory.mktemp("peers") / "project")
    project_env(project, monkeypatch)
    # What the peers trained on, as TRL got it: GRPO's rewards, DPO's pairs.
    rewarded: list[tuple[str, float]] = []
    answer_reward = grpo.answer_reward
    monkeypatch.setattr(grpo, "answer_reward",
                        lambda text, *a: rewarded.append((text, answer_reward(text, *a))) or rewarded[-1][1])
    paired: list[tuple[str, str]] = []
    collate = csr.PairCollator.__call__
    monkeypatch.setattr(csr.PairCollator, "__call__",
                        lambda self, ex: paired.extend((e["chosen"], e["rejected"]) for e in ex) or collate(self, ex))

    out = project / "outputs" / "peers"
    config = project / "tiny.yaml"
    argv = ["--world", "data", "--seeds", "0", "--rounds", "1", "--config", str(config), "--out", str(out),
            "--project", str(project)]
    assert _bench().main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads((out / "peers.json").read_text())
    assert json.loads(printed[-1]) == result
    assert any(line.startswith("trl-grpo") for line in printed) and any(line.startswith("base") for line in printed)

    # The shape, finite numbers; one seed: no std.
    assert result["seeds"] == [0] and list(result["methods"]) == list(METHODS)
    cfg = load_config(config)
    for method, figures in result["methods"].items():
        for key in CURVES:
            assert len(figures[key]) == 2 and all(math.isfinite(v) for v in figures[key]), (method, key)
            assert figures[f"{key}_std"] == [None, None]
        assert figures["seconds_per_answer"] > 0 and math.isfinite(figures["seconds_per_answer"])
        assert figures["peak_rss_mb"] > 0 and figures["lr"] == cfg.ppo.lr
        assert not figures["stages_cached"]  # all trained in this process: its seconds are measured here
    assert not result["lr"]["tuned"] and "ppo.lr" in result["lr"]["how"]
    # Round 0: the same base model through the same evaluation for all four.
    for key in CURVES:
        assert len({f[key][0] for f in result["methods"].values()}) == 1, key
    images, n = cfg.rollout.images_per_round, cfg.rollout.n_per_image
    answers = {m: f["answers"] for m, f in result["methods"].items()}
    assert answers == {"fisao": images * (n + cfg.rollout.questions_per_image),
                       "fisao-sentence": images * (n + cfg.rollout.questions_per_image),
                       "trl-grpo": images * n, "csr-dpo": images * n}

    # The peers trained on the images of FiSAO's round 1, n answers each, and on what their rounds hold.
    expected_ids = sorted(e.image_id for e in round_examples(project / "data" / "world", cfg.rollout, 1))
    (grpo_dir,), (csr_dir,) = (result["methods"][m]["round_dirs"][0] for m in ("trl-grpo", "csr-dpo"))
    grpo_rows = _jsonl(Path(grpo_dir) / grpo.ANSWERS)
    assert sorted({r["image_id"] for r in grpo_rows}) == expected_ids
    assert sorted(r["image_id"] for r in grpo_rows) == sorted(expected_ids * n)
    assert [(r["text"], r["reward"]) for r in grpo_rows] == rewarded
    csr_rows, pairs = _jsonl(Path(csr_dir) / csr.ANSWERS), _jsonl(Path(csr_dir) / csr.PAIRS)
    assert sorted(r["image_id"] for r in csr_rows) == sorted(expected_ids * n)
    for r in csr_rows:
        assert r["score"] == pytest.approx(csr.CSR_LAMBDA * r["mean_logprob"] + (1 - csr.CSR_LAMBDA) * r["clip"], abs=1e-6)
    assert pairs and sorted(paired) == sorted((p["chosen"], p["rejected"]) for p in pairs)
    for p in pairs:  # each pair is its image's best and worst scored answer
        mine = [r for r in csr_rows if r["image_id"] == p["image_id"]]
        assert csr_rows[p["chosen_row"]]["score"] == max(r["score"] for r in mine)
        assert csr_rows[p["rejected_row"]]["score"] == min(r["score"] for r in mine)

    # MLflow: each method a campaign (parent + rounds 0 and 1, `round` param, the figures of peers.json).
    _check_mlflow(result)
    assert (out / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Again: FiSAO's rounds are taken as done, the peers' rounds and the evaluations found on disk,
    # nothing trained or logged twice, the same figures.
    rewarded.clear()
    paired.clear()
    (out / "peers.png").unlink()
    assert _bench().main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not rewarded and not paired
    for method, figures in again["methods"].items():
        assert figures["stages_cached"], method
        assert figures["round_dirs"] == result["methods"][method]["round_dirs"]
        assert {k: figures[k] for k in CURVES} == {k: result["methods"][method][k] for k in CURVES}
    _check_mlflow(again)
    assert (out / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_mlflow(result: dict) -> None:
    """Each method a campaign: a finished parent run, one complete nested run per round (a `round`
    param, the figures of peers.json)."""
    from mlflow.tracking import MlflowClient

    from tasks.mlflow_store import mlflow_key

    client = MlflowClient()
    for method, figures in result["methods"].items():
        (name,) = figures["campaigns"]
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id], filter_string="tags.`fisao.kind` = 'round' and "
                                  "tags.`fisao.complete` = 'true'")
        assert sorted(int(r.data.params["round"]) for r in runs) == [0, 1], method
        for run in runs:
            k = int(run.data.params["round"])
            for key in CURVES:  # logged under MLflow's names (eval/chair_i), the same figures as peers.json
                assert run.data.metrics[mlflow_key(key)] == pytest.approx(figures[key][k]), (method, key, k)
        (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`fisao.kind` = 'campaign'")
        assert parent.data.tags["fisao.status"] == "finished"
        assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    # One MLflow view of all four campaigns: the compare link names exactly their experiments.
    ids = sorted((client.get_experiment_by_name(f["campaigns"][0]).experiment_id for f in result["methods"].values()),
                 key=int)
    assert result["mlflow_compare"].endswith("?experiments=[" + ",".join(f'"{i}"' for i in ids) + "]"
                                             "&workflowType=machine_learning")
