"""bench/round.py and bench/overhead.py on tiny sizes, in a subprocess as a user runs them.

The mechanics, never the speed: the last line is JSON with issue 16's keys, every time is
positive, each ratio is the quotient of the figures printed beside it, the plain loops did the
round's own work (as many answers, the update's micro-batches in the update's order), and the
overhead's spans add up to each run's wall time with both runs computing the same metrics.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
ROUND_KEYS = ("round_s", "rollouts_s", "score_s", "update_s", "eval_s", "tokens_per_s", "generate_tokens_per_s",
              "generate_ratio", "update_answers_per_s", "plain_update_answers_per_s", "peak_rss_mb")


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str, timeout: int = 900) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads(done.stdout.strip().splitlines()[-1])


def test_round_bench_beside_its_plain_loops(tiny_models):
    done, out = _run("round.py", "--config", TINY, "--world", str(tiny_models["world"]), "--clip",
                     str(tiny_models["clip"]), "--llava", str(tiny_models["llava"]))
    shutil.rmtree(out["workdir"])  # the round's temp folder (its stages' files), read no further
    assert set(ROUND_KEYS) <= set(out)
    assert all(out[k] > 0 for k in ROUND_KEYS), {k: out[k] for k in ROUND_KEYS}
    assert out["round_s"] == pytest.approx(out["rollouts_s"] + out["score_s"] + out["update_s"] + out["eval_s"], abs=0.02)
    assert out["generate_ratio"] == round(out["tokens_per_s"] / out["generate_tokens_per_s"], 3)
    assert out["update_ratio"] == round(out["update_answers_per_s"] / out["plain_update_answers_per_s"], 3)
    # The plain loops did the round's work: every rollout row sampled again, every trained answer trained again.
    assert out["plain_generate"]["answers"] == out["rollouts"]
    assert out["plain_generate"]["tokens_per_s"] == out["generate_tokens_per_s"] > 0
    assert out["plain_update"]["answers"] == out["update_answers"] > 0
    assert out["plain_update"]["answers_per_s"] == out["plain_update_answers_per_s"]
    assert out["update_answers_per_s"] == round(out["update_answers"] / out["update_stage_s"], 2)
    assert 0 < out["sampling_s"] <= out["rollouts_s"]
    # The ratios are printed beside the figures they divide.
    assert f"ratio {out['generate_ratio']:.3f}" in done.stdout and f"ratio {out['update_ratio']:.3f}" in done.stdout


def test_plain_update_takes_the_updates_micro_batches(tiny_models, monkeypatch):
    """The rows of every micro-batch `ppo_update` trains on, in its order, for `update_stage`'s
    generator seed: what bench/round.py's plain loop replays (two epochs, accumulation 2)."""
    from fisao.align import update as update_module
    from fisao.align.lora import add_lora
    from fisao.align.rollout import sample_rollouts
    from fisao.coco import load_image
    from fisao.config import LoraConfig, PPOConfig
    from fisao.generate import load_policy

    model, processor = load_policy(tiny_models["llava"])
    images = [load_image(tiny_models["world"] / "train" / "images" / f"{i:06d}.png") for i in (1, 2, 3)]
    rollouts = sample_rollouts(model, processor, images, "Describe this image in detail.", n_per_image=3,
                               max_new_tokens=6, batch_size=9, seed=0, progress=False)
    seen = []
    train = update_module._train_micro_batch
    monkeypatch.setattr(update_module, "_train_micro_batch",
                        lambda actor, p, i, r, rows, *a: seen.append(rows.tolist()) or train(actor, p, i, r, rows, *a))
    cfg, round_index = PPOConfig(minibatch_size=2, grad_accum=2, epochs=2, target_kl=None, seed=3), 2
    torch.manual_seed(0)
    stats = update_module.ppo_update(add_lora(model, LoraConfig(r=4, alpha=8)), processor, images, rollouts,
                                     rollouts.mask.float(), cfg, update_module.make_accelerator(cfg, cpu=True),
                                     torch.Generator().manual_seed(cfg.seed * 1000 + round_index))
    steps = int(stats["optimizer_steps"])
    assert steps == 4  # 9 answers: two steps of 2 x 2 per epoch, one answer sits each epoch out
    replayed = _bench("round").update_micro_batches(len(rollouts), cfg, round_index, steps)
    assert [rows.tolist() for rows in replayed] == seen
    assert [rows.tolist() for rows in _bench("round").update_micro_batches(len(rollouts), cfg, round_index, 3)] == seen[:6]


def test_overhead_refuses_bad_input_before_running(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "overhead.py"), "--config",
                           str(ROOT / "configs" / "llava-1.5-7b.yaml")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "a `model` section" in done.stderr and "--tiny" in done.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("kept")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "overhead.py"), "--tiny", "--workdir",
                           str(tmp_path / "busy")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "is not an empty folder" in done.stderr
    assert (tmp_path / "busy" / "file").read_text() == "kept"


@pytest.mark.e2e
def test_overhead_bench_plain_beside_fisao_run(tmp_path):
    """Both runs of one tiny round: the flow's spans are measured where they happen (the Prefect
    server, MLflow, the report, manifests), each run's spans add up to its wall time, and both
    runs did the same campaign with the same settings."""
    bench = _bench("overhead")
    # A setting that changes round 1's work: were it lost on the way to either run, their metrics would differ.
    done, out = _run("overhead.py", "--tiny", "--rounds", "1", "--set", "rollout.images_per_round=4",
                     "--workdir", str(tmp_path / "work"))
    assert out["plain_s"] > 0 and out["flow_s"] > 0
    assert out["ratio"] == round(out["flow_s"] / out["plain_s"], 3)
    assert out["difference_s"] == pytest.approx(out["flow_s"] - out["plain_s"], abs=0.011)
    # Each span is rounded to 0.01 s: 14 of them may drift by 0.07 s at most.
    assert sum(out["plain"].values()) == pytest.approx(out["plain_s"], abs=0.08)
    assert sum(out["flow"].values()) == pytest.approx(out["flow_s"], abs=0.08)
    assert sum(out["where"].values()) == pytest.approx(out["difference_s"], abs=0.15)
    assert list(out["flow"]) == list(out["plain"]) == list(out["where"]) == list(bench.SPANS)
    # Measured in the flow, absent from the plain run.
    for span in ("server_start", "mlflow", "report", "sha256", "manifests", "prefect_artifacts"):
        assert out["flow"][span] > 0 and out["plain"][span] == 0, span
    assert out["plain"]["library"] > 0 and out["flow"]["library"] > 0
    # world, CLIP, LLaVA, base evaluation, calibration; rollouts, score, update, evaluation of round 1
    assert out["flow_calls"]["library"] == 9 and out["flow_calls"]["manifests"] == 1 and out["flow_calls"]["report"] == 1
    # The same campaign: both evaluated the base model and round 1 with the same results.
    assert len(out["chair_i"]["plain"]) == 2 and out["same_metrics"]
    assert f"ratio {out['ratio']:.3f}" in done.stdout
    # CPU seconds: the plain run has no server, the flow's server did work.
    cpu = out["cpu"]
    assert cpu["plain"]["server"] == 0 and cpu["flow"]["server"] > 0 and cpu["plain"]["process"] > 0
    assert cpu["flow_s"] == pytest.approx(sum(cpu["flow"].values()), abs=0.03)
    assert cpu["ratio"] == round(cpu["flow_s"] / cpu["plain_s"], 3)
    assert out["workdir"] == str(tmp_path / "work") and (tmp_path / "work" / "flow.log").is_file()


def test_supervised_bound_trains_the_rounds_adapters_on_the_truth_and_evaluates_both(tiny_models, tmp_path):
    done, out = _run("supervised.py", "--config", TINY, "--world", str(tiny_models["world"]), "--llava",
                     str(tiny_models["llava"]), "--images", "9", "--epochs", "2", "--lr", "0.01", "--out", str(tmp_path))
    assert out["steps"] == 2 * (9 // 4) and out["seconds"] > 0 and out["split"] == "val"
    for name in ("base", "supervised"):
        metrics = json.loads((tmp_path / f"eval-{name}" / "metrics.json").read_text())["metrics"]
        assert {k: round(metrics[k], 4) for k in out[name]} == out[name]
    if out["base"]["chair_i"]:
        change = round((out["supervised"]["chair_i"] - out["base"]["chair_i"]) / out["base"]["chair_i"], 4)
        assert out["chair_i_change"] == change and f"CHAIR_i change {change:+.1%}" in done.stdout
    else:  # the tiny crisp world's base names nothing wrong on val: no relative change to print
        assert out["chair_i_change"] is None and "the base names nothing wrong" in done.stdout
    # The merged policy is the base plus trained adapters: its language model moved, its vision tower did not.
    from safetensors.torch import load_file
    base = load_file(tiny_models["llava"] / "model.safetensors")
    trained = load_file(tmp_path / "policy" / "model.safetensors")
    moved = [k for k in base if not torch.equal(base[k], trained[k])]
    assert moved and all("language_model" in k for k in moved), moved
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "supervised.py"), "--world", str(tiny_models["world"]),
                          "--llava", str(tiny_models["llava"]), "--images", "0"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--images and --epochs must be at least 1" in bad.stderr
