"""bench/peers.py's inputs: what `--world` and `--lrs` mean, and the errors bad ones get (no Prefect, no TRL)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fisao.config import load_config
from fisao.sweep import world_data_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peers_cli", ROOT / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_world_seed_is_the_sweeps_world(bench, tmp_path):
    cfg = load_config(None)
    assert bench.world_overrides(cfg, tmp_path, "3") == ({"world.seed": 3, "data_dir": world_data_dir(cfg, 3)}, "w3")


def test_world_directory_is_the_projects_data_directory(bench, tmp_path):
    cfg = load_config(None)
    (tmp_path / "data" / "world").mkdir(parents=True)
    assert bench.world_overrides(cfg, tmp_path, "data") == ({"data_dir": "data"}, "data")
    (tmp_path / "data" / "world" / "world.json").write_text("{}")  # the world directory itself: its parent
    assert bench.world_overrides(cfg, tmp_path, "data/world") == ({"data_dir": "data"}, "data")
    assert bench.world_overrides(cfg, tmp_path, str(tmp_path / "data")) == ({"data_dir": "data"}, "data")
    with pytest.raises(FileNotFoundError, match="--world nowhere: no directory"):
        bench.world_overrides(cfg, tmp_path, "nowhere")
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    outside.mkdir()
    with pytest.raises(ValueError, match="outside the project"):
        bench.world_overrides(cfg, tmp_path, str(outside))


def test_lrs(bench):
    assert bench.parse_lrs("5e-4,1e-3,2e-3") == (5e-4, 1e-3, 2e-3)
    for bad, match in (("fast", "comma-separated"), ("1e-3,1e-3", "distinct"), ("0,1e-3", "positive"), ("", "give")):
        with pytest.raises(ValueError, match=match):
            bench.parse_lrs(bad)


def test_method_lrs(bench):
    methods = ("fisao", "fisao-sentence", "trl-grpo", "csr-dpo")
    assert bench.parse_method_lrs("fisao=1e-3, trl-grpo=5e-4", methods) == {"fisao": 1e-3, "trl-grpo": 5e-4}
    assert bench.parse_method_lrs("", methods) == {}
    for bad, match in (("grpo=1e-3", "METHOD=RATE"), ("fisao", "METHOD=RATE"), ("fisao=fast", "not a number"),
                       ("fisao=1e-3,fisao=2e-3", "twice"), ("csr-dpo=0", "positive")):
        with pytest.raises(ValueError, match=match):
            bench.parse_method_lrs(bad, methods)


def test_bad_input_exits_2_with_the_fix(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "apply_local_state", lambda project: None)  # no environment changes in a unit test
    monkeypatch.setattr(bench, "quiet_library_bars", lambda: None)
    assert bench.main(["--world", "0", "--seeds", "0,0", "--out", str(tmp_path), "--project", str(tmp_path)]) == 2
    assert "names a seed twice" in capsys.readouterr().err
    assert bench.main(["--world", "0", "--rounds", "0", "--out", str(tmp_path), "--project", str(tmp_path)]) == 2
    assert "--rounds is 0" in capsys.readouterr().err
    assert bench.main(["--world", "0", "--config", str(tmp_path / "no.yaml"), "--out", str(tmp_path),
                       "--project", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert bench.main(["--world", "0", "--tune", "--lr", "fisao=1e-3", "--out", str(tmp_path),
                       "--project", str(tmp_path)]) == 2
    assert "use one of the two" in capsys.readouterr().err
