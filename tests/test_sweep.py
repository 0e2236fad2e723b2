"""The sweep's plan, per-run record, mean/std and table, on hand-written values (no Prefect, no MLflow)."""
from __future__ import annotations

import math

import pytest

from fisao.config import load_config
from fisao.locks import CampaignLocked
from fisao.summary import sweep_table
from fisao.sweep import FIELDS, aggregate, parse_seeds, plan, relative_cut, run_record, sweep_lock


def _round(chair_i, yes=(0.5, 0.5, 0.5), kl=None, **more):
    r = {"chair_s": 2 * chair_i, "chair_i": chair_i, "recall": 0.6, "pope_random_f1": 0.8, "pope_popular_f1": 0.7,
         "pope_adversarial_f1": 0.6, **more}
    r.update({f"pope_{s}_yes_ratio": v for s, v in zip(("random", "popular", "adversarial"), yes)})
    if kl is not None:
        r["update/kl"] = kl
    return r


def test_parse_seeds_reads_lists_and_names_the_option_in_errors():
    assert parse_seeds("10, 11,12", "--worlds") == (10, 11, 12)
    assert parse_seeds("0", "--seeds") == (0,)
    with pytest.raises(ValueError, match=r"--worlds takes comma-separated integers.*'1,x'"):
        parse_seeds("1,x", "--worlds")
    with pytest.raises(ValueError, match="--seeds needs at least one seed"):
        parse_seeds(" , ", "--seeds")
    with pytest.raises(ValueError, match="--seeds names a seed twice"):
        parse_seeds("1,1", "--seeds")


def test_plan_gives_each_world_its_data_dir_and_each_seed_the_training_seeds():
    cfg = load_config(None)
    runs = plan(cfg, "q", (10, 11), (0, 1))
    assert [r.name for r in runs] == ["q-w10-s0", "q-w10-s1", "q-w11-s0", "q-w11-s1"]
    # A world's training seeds share its data directory (and so its base models); worlds never share one.
    assert runs[0].data_dir == runs[1].data_dir != runs[2].data_dir == runs[3].data_dir
    assert all(r.data_dir.startswith("data-sweep-w") and r.data_dir != cfg.data_dir for r in runs)
    resolved = load_config(None, runs[3].overrides)
    assert (resolved.world.seed, resolved.rollout.seed, resolved.ppo.seed) == (11, 1, 1)
    assert (resolved.clip.seed, resolved.llava.seed) == (cfg.clip.seed, cfg.llava.seed)
    assert resolved.data_dir == runs[3].data_dir
    # Another world option, another directory: a sweep never regenerates a world another sweep recorded.
    other = load_config(None, {"world.pretrain_size": 100})
    assert plan(other, "q", (10,), (0,))[0].data_dir != runs[0].data_dir


def test_plan_refuses_real_models_and_odd_names(tmp_path):
    with pytest.raises(ValueError, match="sweep name '../x' must be a plain name"):
        plan(load_config(None), "../x", (1,), (0,))
    real = load_config(None, {"model": {"policy": "p", "verifier": "v"}, "data": {"root": "data/coco"},
                              "rollout.split": "train"})
    with pytest.raises(ValueError, match="has a model section"):
        plan(real, "q", (1,), (0,))


def test_run_record_takes_base_final_cut_auroc_yes_ratios_and_kl():
    run = plan(load_config(None), "q", (3,), (1,))[0]
    rounds = [_round(0.2, yes=(0.9, 0.9, 0.9)), _round(0.15, yes=(0.4, 0.45, 0.6), kl=0.1),
              _round(0.12, yes=(0.5, 0.55, 0.38), kl=0.3)]
    rec = run_record(run, rounds, {"auroc": 0.85, "hallucinated_share": 0.2, "baseline": 0.1})
    assert (rec["run"], rec["world"], rec["seed"], rec["rounds"]) == ("q-w3-s1", 3, 1, 2)
    assert (rec["base_chair_i"], rec["final_chair_i"]) == (0.2, 0.12)
    assert (rec["base_chair_s"], rec["final_chair_s"]) == (0.4, 0.24)
    assert rec["chair_i_cut"] == pytest.approx(0.4)
    assert (rec["verifier_auroc"], rec["hallucinated_share"]) == (0.85, 0.2)
    assert [rec[f"final_pope_{s}_yes_ratio"] for s in ("random", "popular", "adversarial")] == [0.5, 0.55, 0.38]
    # Over rounds 1.. only (the base's 0.9 is not the method's doing).
    assert (rec["yes_ratio_min"], rec["yes_ratio_max"]) == (0.38, 0.6)
    assert rec["final_kl"] == 0.3
    assert set(FIELDS) <= set(rec)


def test_a_base_only_run_record_is_the_base_models_figures():
    """`fisao sweep --rounds 0` checks worlds and base models (verifier AUROC, base hallucination)."""
    run = plan(load_config(None), "q", (3,), (1,))[0]
    rec = run_record(run, [_round(0.2, yes=(0.3, 0.5, 0.7))], {"auroc": 0.85, "hallucinated_share": 0.2})
    assert rec["rounds"] == 0 and rec["base_chair_i"] == rec["final_chair_i"] == 0.2
    assert rec["chair_i_cut"] == 0.0 and (rec["yes_ratio_min"], rec["yes_ratio_max"]) == (0.3, 0.7)
    assert rec["verifier_auroc"] == 0.85 and rec["final_kl"] is None


def test_run_record_cuts_each_cause_of_the_worlds_hallucinations():
    run = plan(load_config(None), "q", (3,), (1,))[0]
    causes = lambda look, pair, other: {"halluc_lookalike": look, "halluc_pair": pair, "halluc_other": other}
    rec = run_record(run, [_round(0.2, **causes(0.1, 0.4, 0.2)), _round(0.1, kl=0.1, **causes(0.05, 0.3, 0.0))],
                     {"auroc": 0.85, "hallucinated_share": 0.2})
    assert (rec["base_halluc_pair"], rec["final_halluc_pair"]) == (0.4, 0.3)
    assert rec["halluc_lookalike_cut"] == pytest.approx(0.5)
    assert rec["halluc_pair_cut"] == pytest.approx(0.25)
    assert rec["halluc_other_cut"] == pytest.approx(1.0)
    row = sweep_table([rec], *aggregate([rec])).splitlines()[2].split()
    assert "50.0%/25.0%/100.0%" in row
    # Off the world (COCO) there are no causes: the record says None and the table "-".
    coco = run_record(run, [_round(0.2), _round(0.1, kl=0.1)], {"auroc": 0.85, "hallucinated_share": 0.2})
    assert coco["halluc_pair_cut"] is None
    assert "-/-/-" in sweep_table([coco], *aggregate([coco])).splitlines()[2].split()


def test_relative_cut_is_none_without_anything_to_cut():
    assert relative_cut(0.25, 0.1) == pytest.approx(0.6)
    assert relative_cut(0.1, 0.15) == pytest.approx(-0.5)
    assert relative_cut(0.0, 0.0) is None


def test_aggregate_mean_and_sample_std_by_hand():
    recs = [{f: None for f in FIELDS} for _ in range(3)]
    for rec, v in zip(recs, (1.0, 2.0, 6.0)):
        rec["final_chair_i"] = v
    for rec, v in zip(recs, (0.5, None, 0.3)):  # one run had nothing to cut
        rec["chair_i_cut"] = v
    recs[0]["final_kl"] = 0.7
    mean, std = aggregate(recs)
    assert (mean["run"], std["run"]) == ("mean", "std")
    assert mean["final_chair_i"] == pytest.approx(3.0)
    assert std["final_chair_i"] == pytest.approx(math.sqrt(7.0))  # deviations -2, -1, 3: 14 / (3 - 1)
    assert mean["chair_i_cut"] == pytest.approx(0.4) and std["chair_i_cut"] == pytest.approx(math.sqrt(0.02))
    assert mean["final_kl"] == 0.7 and std["final_kl"] is None  # one value: no spread to tell
    assert mean["base_recall"] is None and std["base_recall"] is None


def test_sweep_table_shows_base_to_final_cut_and_the_mean_and_std_rows():
    cfg = load_config(None)
    runs = [run_record(r, [_round(b), _round(f, yes=(0.5, 0.45, 0.4), kl=k)], {"auroc": a, "hallucinated_share": 0.2})
            for r, b, f, k, a in zip(plan(cfg, "q", (10, 11), (0,)), (0.2, 0.1), (0.12, 0.08), (0.3, 0.5), (0.8, 0.9))]
    mean, std = aggregate(runs)
    lines = sweep_table(runs, mean, std).splitlines()
    assert lines[0].split()[:3] == ["run", "chair_s", "chair_i"]
    row = lines[2].split()
    assert row[:2] == ["w10", "s0"] and row[3] == "0.200→0.120" and "40.0%" in row
    assert "0.500/0.450/0.400" in row and row[-1] == "0.300" and "0.800" in row
    mean_row, std_row = lines[4].split(), lines[5].split()
    assert mean_row[0] == "mean" and mean_row[2] == "0.150→0.100" and "30.0%" in mean_row and mean_row[-1] == "0.400"
    assert std_row[0] == "std" and std_row[2] == f"{math.sqrt(0.005):.3f}→{math.sqrt(0.0008):.3f}"


def test_sweep_lock_refuses_a_second_holder_by_name(tmp_path):
    import subprocess
    import sys

    lock = tmp_path / "outputs" / "sweeps" / "q" / ".lock"
    code = ("import sys, time; from fisao.sweep import sweep_lock\n"
            f"with sweep_lock({str(tmp_path)!r}, 'outputs', 'q'):\n    print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CampaignLocked, match=rf"sweep 'q' is already running: pid {holder.pid} .* new --name"):
            with sweep_lock(tmp_path, "outputs", "q"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with sweep_lock(tmp_path, "outputs", "q"):  # free again once its holder died
        assert lock.is_file()


def test_cli_sweep_refuses_bad_seeds_before_starting_anything(tmp_path, monkeypatch, capsys):
    from fisao.localstate import local_state_env
    from cli.main import main

    for key, value in local_state_env(tmp_path).items():  # main() sets these; monkeypatch undoes them
        monkeypatch.setenv(key, value)
    rc = main(["--project", str(tmp_path), "sweep", "--config", "configs/demo.yaml", "--worlds", "10,x"])
    assert rc == 2 and "--worlds takes comma-separated integers such as 10,11,12, got '10,x'" in capsys.readouterr().err
    rc = main(["--project", str(tmp_path), "sweep", "--config", "configs/demo.yaml", "--worlds", "1", "--seeds", "0,0"])
    assert rc == 2 and "--seeds names a seed twice" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()



def test_print_sweep_names_failed_campaigns_and_says_what_the_mean_covers(capsys):
    from fisao.summary import print_sweep

    cfg = load_config(None)
    ok, bad = plan(cfg, "q", (10, 11), (0,))
    rec = run_record(ok, [_round(0.2), _round(0.1, kl=0.2)], {"auroc": 0.9, "hallucinated_share": 0.2})
    mean, std = aggregate([rec])
    print_sweep({"name": "q", "config": "c.yaml", "worlds": [10, 11], "seeds": [0], "runs": [rec], "mean": mean,
                 "std": std, "path": "outputs/sweeps/q/sweep.json",
                 "failed": [{"run": bad.name, "world": 11, "seed": 0, "error": "ValueError: cannot tell them apart"}],
                 "campaigns": {ok.name: {"seconds": 1.5, "resume": {"verified_rounds": [1]}}}})
    out = capsys.readouterr().out
    assert "FAILED q-w11-s0 (world 11, seed 0): ValueError: cannot tell them apart" in out
    assert "mean and std are over the 1 finished runs" in out
    assert any(line.startswith("w10 s0") and "50.0%" in line for line in out.splitlines())
