"""`fisao world build`, in process: it writes the world, and a bad config is a clean error."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fisao import dvcdata
from fisao.dvcdata import verify
from fisao.localstate import local_state_env
from fisao.world.build import read_world_config
from flows.cli import main

SIZES = {"train": 10, "val": 3, "test": 5}


@pytest.fixture(autouse=True)
def project_env(tmp_path, monkeypatch):
    # main() sets these with os.environ.setdefault; setting them here first lets monkeypatch undo it.
    for key, value in local_state_env(tmp_path).items():
        monkeypatch.setenv(key, value)


def write_config(tmp_path: Path, world: dict) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({"name": "small", "world": {"pretrain_size": 0, **world}}))
    return path


def test_world_build_writes_the_world(tmp_path, capsys):
    cfg = write_config(tmp_path, {"sizes": SIZES, "seed": 0})
    out = tmp_path / "w" / "world"
    assert main(["--project", str(tmp_path), "world", "build", "--out", str(out), "--seed", "3", "--config", str(cfg)]) == 0
    world = read_world_config(out)
    assert world.seed == 3 and dict(world.sizes) == SIZES  # --seed overrides the file
    assert len(list((out / "train" / "images").glob("*.png"))) == SIZES["train"]
    assert f"built the world (seed 3) in {out}" in capsys.readouterr().out


def test_a_bad_config_key_is_an_error_naming_it(tmp_path, capsys):
    cfg = write_config(tmp_path, {"sizes": SIZES, "colour": ["red"]})
    out = tmp_path / "world"
    assert main(["--project", str(tmp_path), "world", "build", "--out", str(out), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fisao: error: invalid config file {cfg}:")
    assert "world.colour: unknown key" in err
    assert not out.exists()


def test_a_missing_config_is_an_error(tmp_path, capsys):
    assert main(["--project", str(tmp_path), "world", "build", "--out", str(tmp_path / "w"),
                 "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_track_records_the_world_in_dvc(tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    assert dvcdata.dvc(project, "init", "--no-scm", "-q").returncode == 0
    cfg = write_config(tmp_path, {"sizes": SIZES})
    argv = ["--project", str(project), "world", "build", "--config", str(cfg), "--track"]
    assert main([*argv, "--out", str(project / "data" / "world")]) == 0
    md5 = verify(project, "data")
    assert f"recorded data/ as {md5} in data.dvc and data.md5" in capsys.readouterr().out
    # --out outside the project cannot be tracked: said before anything is built.
    assert main([*argv, "--out", str(tmp_path / "elsewhere")]) == 2
    assert "--track needs --out inside the project" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()
