"""What the campaign and sweep summaries print: the one-line result and the MLflow link."""
from __future__ import annotations

import pytest

from fisao.summary import headline, print_summary, runs_link, sweep_headline

ROUNDS = [{"chair_i": 0.145, "recall": 0.620}, {"chair_i": 0.114, "recall": 0.631},
          {"chair_i": 0.059, "recall": 0.624}, {"chair_i": 0.070, "recall": 0.600}]


def test_headline_is_base_to_the_lowest_chair_i_round_with_its_recall():
    assert headline(ROUNDS) == "CHAIR_i 0.145 base → 0.059 best (round 2 of 3), recall 0.620 → 0.624"


def test_headline_of_a_campaign_without_rounds_is_the_base_model():
    assert headline(ROUNDS[:1]) == "CHAIR_i 0.145 (base model, no rounds yet)"


def test_sweep_headline_is_the_mean_base_to_final():
    mean = {"base_chair_i": 0.1, "final_chair_i": 0.05}
    assert sweep_headline([{}, {}], mean) == "mean CHAIR_i 0.100 base → 0.050 final over 2 campaigns"
    assert sweep_headline([], {"base_chair_i": None}) == "0 campaigns finished, no CHAIR_i to average"


def test_the_summary_prints_the_result_and_the_experiments_runs_table_link(capsys):
    summary = {"name": "demo", "stages": {}, "world": {"path": "/w", "action": "verified", "md5": "m"},
               "clip": {"path": "/c"}, "llava": {"path": "/l"}, "rounds": ROUNDS,
               "mlflow": {"experiment_id": "7", "run_id": "r"}}

    print_summary(summary)

    out = capsys.readouterr().out
    assert "demo: CHAIR_i 0.145 base → 0.059 best (round 2 of 3)" in out
    assert "open http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning" in out
    assert runs_link("7") in out


def test_the_summary_says_where_the_registered_rounds_are(capsys):
    summary = {"name": "demo", "stages": {}, "world": {"path": "/w", "action": "verified", "md5": "m"},
               "clip": {"path": "/c"}, "llava": {"path": "/l"}, "rounds": ROUNDS,
               "registry": {"name": "demo", "versions": {"1": "1", "2": "2", "3": "3"}, "aliases": {"best": "2"}}}

    print_summary(summary)

    assert ("registered model demo: models:/demo@best (version 2, round 2), models:/demo/latest (version 3, round 3); "
            "`fisao eval model --model models:/demo@best`") in capsys.readouterr().out


def test_the_compare_link_names_each_experiment_once_in_numeric_order():
    from fisao.summary import MLFLOW_UI, compare_link

    assert compare_link(["12", "3", "12"]) == (
        f'{MLFLOW_UI}/#/compare-experiments/s?experiments=["3","12"]&workflowType=machine_learning')
    with pytest.raises(ValueError, match="at least one experiment"):
        compare_link([])
