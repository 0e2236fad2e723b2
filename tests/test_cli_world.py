"""`fisao world build`, in process: it writes the world, and a bad config is a clean error."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cli.main import main
from fisao import dvcdata
from fisao.dvcdata import verify
from fisao.localstate import local_state_env
from fisao.world.build import read_world_config

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


def build(tmp_path: Path, out, *extra: str) -> int:
    cfg = write_config(tmp_path, {"sizes": SIZES})
    return main(["--project", str(tmp_path / "project"), "world", "build", "--config", str(cfg), "--out", str(out), *extra])


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    return tmp_path / "project"


def test_a_folder_holding_other_files_is_refused_and_kept(tmp_path, project, capsys):
    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    for extra in ((), ("--force",)):  # --force replaces only a previous world
        assert build(tmp_path, mine, *extra) == 2
        err = capsys.readouterr().err
        assert f"--out {mine} is not empty and is not only a world that `fisao world build` wrote: it holds " \
               "notes.txt, photos/. Nothing was written." in err and err.count("\n") == 1
        assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt", "photos"]


def test_a_previous_world_is_replaced_only_with_force_and_not_with_files_added(tmp_path, project, capsys):
    out = tmp_path / "w"
    assert build(tmp_path, out) == 0 and build(tmp_path, out) == 0  # the same world again: nothing to lose
    assert build(tmp_path, out, "--seed", "2") == 2
    assert "holds a world built with another config (seed 0" in capsys.readouterr().err
    assert read_world_config(out).seed == 0
    assert build(tmp_path, out, "--seed", "2", "--force") == 0 and read_world_config(out).seed == 2
    (out / "mine.txt").write_text("added by hand")
    assert build(tmp_path, out, "--force") == 2
    assert "it holds mine.txt" in capsys.readouterr().err and (out / "mine.txt").is_file()


@pytest.mark.parametrize("out", [".", "..", "~", "/", "project-parent"])
def test_folders_that_hold_the_project_or_home_are_refused(tmp_path, project, capsys, out):
    given = str(tmp_path) if out == "project-parent" else out
    write_config(tmp_path, {"sizes": SIZES})
    before = sorted(p.name for p in tmp_path.iterdir())
    assert build(tmp_path, given) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fisao: error: --out {given} (") and "would replace " in err
    assert ("your home directory" if out == "~" else "the project") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_file_as_out_is_refused(tmp_path, project, capsys):
    (tmp_path / "f.txt").write_text("x")
    assert build(tmp_path, tmp_path / "f.txt") == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_world_too_large_for_the_disk_or_memory_is_refused_before_building(tmp_path, project, capsys):
    cfg = write_config(tmp_path, {"sizes": {"train": 1_000_000_000, "val": 1, "test": 1}})
    out = tmp_path / "huge"
    assert main(["--project", str(project), "world", "build", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "make 1,000,000,002 images: about" in err and "Nothing was written; lower world.sizes" in err
    assert not out.exists() and not list(tmp_path.glob(".huge*"))


def test_a_read_only_or_full_disk_is_one_line_naming_the_folder(tmp_path, project, capsys, monkeypatch):
    import errno

    from fisao import io

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "atomic_write_bytes", full)  # the world's first file (world.json)
    out = tmp_path / "w"
    assert build(tmp_path, out) == 2
    assert capsys.readouterr().err == f"fisao: error: {out}: cannot write the world: No space left on device\n"
    assert not out.exists() and not list(tmp_path.glob(".w.*"))  # nothing half-written is left


def test_a_project_that_does_not_exist_is_not_created(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["--project", str(missing), "runs"]) == 2
    assert f"--project {missing} is not a directory" in capsys.readouterr().err
    assert not missing.exists()


def test_check_fits_names_memory_when_memory_is_short(tmp_path, monkeypatch):
    from fisao.config import load_config
    from fisao.world import target

    cfg = load_config(None, {"world.sizes": SIZES, "world.pretrain_size": 0}).world
    disk, memory = target.estimate_bytes(cfg)
    assert disk == 18 * (4096 + 64 * 64 // 8 + 1024) and memory == 18 * 2048
    target.check_fits(tmp_path, cfg)  # 18 images fit anywhere
    monkeypatch.setattr(target, "available_ram", lambda: memory - 1)
    with pytest.raises(ValueError, match=r"make 18 images: about 0.0 GiB, but 0.0 GiB are of memory available"):
        target.check_fits(tmp_path, cfg)
    monkeypatch.setattr(target, "free_disk", lambda path: disk - 1)
    with pytest.raises(ValueError, match=f"are free on the disk of {tmp_path}"):
        target.check_fits(tmp_path, cfg)
