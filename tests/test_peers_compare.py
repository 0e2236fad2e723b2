"""The side-by-side's arithmetic (fisao/peers/compare.py): curves over seeds, the lr picked on val, names."""
from __future__ import annotations

import math

import pytest

from fisao.peers.compare import METHODS, campaign_name, curves, pick_lr, seed_overrides


def _round(chair_i, recall, chair_s=0.5, f1=0.8):
    return {"chair_i": chair_i, "recall": recall, "chair_s": chair_s, "pope_adversarial_f1": f1}


def test_curves_mean_and_sample_std_per_round():
    runs = [[_round(0.3, 0.7), _round(0.2, 0.6)], [_round(0.3, 0.7), _round(0.1, 0.8)]]
    got = curves(runs)
    assert got["chair_i"] == pytest.approx([0.3, 0.15])
    assert got["recall"] == pytest.approx([0.7, 0.7])
    # sample std of (0.2, 0.1): sqrt(2 * 0.05^2 / 1) = 0.0707...; of (0.6, 0.8): 0.1414...
    assert got["chair_i_std"] == pytest.approx([0.0, math.sqrt(0.005)])
    assert got["recall_std"] == pytest.approx([0.0, math.sqrt(0.02)])
    assert set(got) == {k + s for k in ("chair_s", "chair_i", "recall", "pope_adversarial_f1") for s in ("", "_std")}


def test_curves_one_seed_has_no_std_and_uneven_seeds_are_refused():
    got = curves([[_round(0.3, 0.7), _round(0.2, 0.6)]])
    assert got["chair_i"] == [0.3, 0.2] and got["chair_i_std"] == [None, None]
    with pytest.raises(ValueError, match="different numbers of rounds"):
        curves([[_round(0.3, 0.7)], [_round(0.3, 0.7), _round(0.2, 0.6)]])
    with pytest.raises(ValueError, match="at least one seed"):
        curves([])


def test_pick_lr_lowest_chair_i_that_keeps_recall():
    base = _round(0.30, 0.70)
    results = {5e-4: [base, _round(0.25, 0.69)],
               1e-3: [base, _round(0.20, 0.685)],   # recall down 1.5 points: kept, lowest CHAIR_i
               2e-3: [base, _round(0.05, 0.40)]}    # collapsed recall: not picked despite CHAIR_i
    assert pick_lr(results) == 1e-3
    # none keeps recall: the one with the most recall
    results = {5e-4: [base, _round(0.25, 0.60)], 1e-3: [base, _round(0.20, 0.65)]}
    assert pick_lr(results) == 1e-3
    # a tie goes to the smaller rate
    assert pick_lr({2e-3: [base, _round(0.2, 0.7)], 1e-3: [base, _round(0.2, 0.7)]}) == 1e-3
    with pytest.raises(ValueError, match="at least one run"):
        pick_lr({})


def test_campaign_names_say_method_seed_and_what_differs():
    assert campaign_name("peers-w0", "fisao", 1, 1e-3, 1e-3) == "peers-w0-fisao-s1"
    assert campaign_name("peers-w0", "csr-dpo", 0, 5e-4, 1e-3, "val") == "peers-w0-csr-dpo-s0-lr0.0005-val"
    assert len({campaign_name("p", m, 0, 1e-3, 1e-3) for m in METHODS}) == 4
    with pytest.raises(ValueError, match="not one of"):
        campaign_name("p", "ppo", 0, 1e-3, 1e-3)
    assert seed_overrides(2) == {"rollout.seed": 2, "ppo.seed": 2}
