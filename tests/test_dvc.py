"""data/ under DVC: our directory md5 is DVC's, and ensure_world creates, verifies, rebuilds or explains.

Real `git` and `dvc` run here (no network); one recorded project is built per module and
copied for each test, so only the tests that must call DVC pay for it.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from fisao import dvcdata
from fisao.config import load_config
from fisao.dvcdata import DataMismatch, dir_md5, file_md5s, read_dvc_file, verify
from fisao.world.store import ensure_world

SIZES = {"train": 6, "val": 2, "test": 4}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


def world_cfg(seed: int = 0):
    return load_config(None, {"world.sizes": SIZES, "world.pretrain_size": 3, "world.seed": seed}).world


def init_project(path: Path, git: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if git:
        subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    res = dvcdata.dvc(path, "init", "-q", *([] if git else ["--no-scm"]))
    assert res.returncode == 0, res.stderr
    return path


def test_dir_md5_is_what_dvc_add_records(tmp_path):
    project = init_project(tmp_path / "p")
    data = project / "data"
    # Names whose order differs between sorting paths as strings and as tuples of parts
    # ("a-c.txt" < "a.txt" < "a/b.txt" as strings), nesting, spaces, non-ASCII, an empty file.
    files = {
        "a/b.txt": b"1\n", "a-c.txt": b"2\n", "a.txt": b"3\n", "sub/deep/x y.bin": bytes(range(256)),
        "sub/é.txt": "é\n".encode(), "empty": b"", "z/world.json": b"{}\n",
    }
    for rel, content in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(content)
    for _ in range(2):  # once as created, once after an edit
        res = dvcdata.dvc(project, "add", "data")
        assert res.returncode == 0, res.stderr
        recorded = read_dvc_file(project / "data.dvc")
        entries = file_md5s(data)
        assert sorted(entries) == sorted(files)
        assert (recorded.md5, recorded.nfiles, recorded.path) == (dir_md5(entries), len(files), "data")
        (data / "a" / "b.txt").write_bytes(b"changed\n")


def test_dir_md5_by_hand():
    # DVC's listing: [{"md5": ..., "relpath": ...}] sorted by relpath, json.dumps(sort_keys=True), md5 + ".dir".
    assert dir_md5({}) == "d751713988987e9331980363e24189ce.dir"  # md5(b"[]")
    assert dir_md5({"b": "2" * 32, "a": "1" * 32}) == dir_md5({"a": "1" * 32, "b": "2" * 32})
    assert dir_md5({"a": "1" * 32}) != dir_md5({"b": "1" * 32})


def test_file_md5s_skips_only_our_temporary_files(tmp_path):
    (tmp_path / ".world.tmp-1234abcd").mkdir()
    (tmp_path / ".world.tmp-1234abcd" / "x").write_text("half-built")
    (tmp_path / ".out.json.tmp-1234abcd").write_text("half-written")
    (tmp_path / ".hidden").write_text("kept")
    (tmp_path / "a.txt").write_text("abc")
    assert file_md5s(tmp_path) == {".hidden": hashlib.md5(b"kept").hexdigest(), "a.txt": hashlib.md5(b"abc").hexdigest()}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A git + DVC project whose world was created and recorded by ensure_world."""
    project = init_project(tmp_path_factory.mktemp("recorded") / "project")
    status = ensure_world(project, "data", world_cfg(), progress=False)
    return project, status


@pytest.fixture
def project(recorded, tmp_path) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(recorded[0], copy, symlinks=True)
    return copy


def test_first_call_creates_and_records_the_world(recorded):
    project, status = recorded
    assert status.action == "created"
    assert status.path == str(project / "data" / "world")
    entries = file_md5s(project / "data")
    assert read_dvc_file(project / "data.dvc").md5 == status.md5 == dir_md5(entries)
    assert dvcdata.read_file_md5s(project / "data.md5") == entries
    assert all(rel.startswith("world/") for rel in entries) and "world/vocab.txt" in entries
    assert "/data" in (project / ".gitignore").read_text().split()


def test_second_call_verifies_without_rebuilding(project, recorded):
    image = project / "data" / "world" / "train" / "images" / "000001.png"
    before = image.stat().st_mtime_ns
    status = ensure_world(project, "data", world_cfg(), progress=False)
    assert (status.action, status.md5, status.path) == ("verified", recorded[1].md5, str(project / "data" / "world"))
    assert image.stat().st_mtime_ns == before


def test_a_deleted_world_is_rebuilt_and_verified(project, recorded):
    shutil.rmtree(project / "data")
    status = ensure_world(project, "data", world_cfg(), progress=False)
    assert (status.action, status.md5) == ("rebuilt", recorded[1].md5)
    assert verify(project, "data") == recorded[1].md5


def test_a_deleted_world_is_pulled_from_a_remote_else_rebuilt(project, recorded, tmp_path):
    for args in (("remote", "add", "-d", "store", str(tmp_path / "store")), ("push", "-q")):
        res = dvcdata.dvc(project, *args)
        assert res.returncode == 0, res.stderr
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")  # only the remote has it now
    status = ensure_world(project, "data", world_cfg(), progress=False)
    assert (status.action, status.md5) == ("pulled", recorded[1].md5)
    # A remote without the data: the pull fails and the world is regenerated instead.
    assert dvcdata.dvc(project, "remote", "modify", "store", "url", str(tmp_path / "empty")).returncode == 0
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    status = ensure_world(project, "data", world_cfg(), progress=False)
    assert (status.action, status.md5) == ("rebuilt", recorded[1].md5)


def test_a_world_built_from_another_config_is_replaced(project, recorded):
    from fisao.world.build import build_world

    build_world(project / "data" / "world", world_cfg(seed=9), progress=False)
    status = ensure_world(project, "data", world_cfg(), progress=False)
    assert (status.action, status.md5) == ("rebuilt", recorded[1].md5)
    assert "another world config" in status.note


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper,expected", [
    (lambda w: flip_byte(w / "train" / "images" / "000002.png"), "changed: world/train/images/000002.png"),
    (lambda w: (w / "test" / "captions.jsonl").unlink(), "missing: world/test/captions.jsonl"),
    (lambda w: (w / "val" / "notes.txt").write_text("mine"), "not in data.dvc: world/val/notes.txt"),
])
def test_verify_names_what_differs_and_how_to_fix_it(project, recorded, tamper, expected):
    tamper(project / "data" / "world")
    with pytest.raises(DataMismatch) as e:
        verify(project, "data")
    message = str(e.value)
    assert f"but data.dvc records {recorded[1].md5}" in message
    assert f"\n  {expected}\n" in message
    assert message.count("\n  ") == 1  # only that file is named
    assert "`dvc add data`" in message and "`git checkout data.dvc data.md5`" in message


def test_ensure_world_repairs_a_corrupted_file(project, recorded):
    image = project / "data" / "world" / "train" / "images" / "000002.png"
    good = image.read_bytes()
    flip_byte(image)
    status = ensure_world(project, "data", world_cfg(), progress=False)
    assert (status.action, status.md5) == ("rebuilt", recorded[1].md5)
    assert image.read_bytes() == good
    # The repair is reported with the file that differed, never silent.
    assert "did not match data.dvc" in status.note and "changed: world/train/images/000002.png" in status.note


def test_ensure_world_stops_on_a_stray_file_it_cannot_regenerate(project):
    (project / "data" / "notes.txt").write_text("not part of the world")
    with pytest.raises(DataMismatch, match="\n  not in data.dvc: notes.txt\n"):
        ensure_world(project, "data", world_cfg(), progress=False)


def test_another_world_than_the_recorded_one_gets_its_own_data_directory(project, recorded):
    from fisao.config import config_hash
    from fisao.world.store import world_data_dir

    world = project / "data" / "world"
    before = {p: p.stat().st_mtime_ns for p in world.rglob("*")}
    other = world_cfg(seed=1)
    own = f"data-world-{config_hash(other)[:12]}"
    assert world_data_dir(project, "data", other) == own and world_data_dir(project, "data", world_cfg()) == "data"
    status = ensure_world(project, "data", other, progress=False)
    assert (status.action, status.data_dir, status.path) == ("created", own, str(project / own / "world"))
    assert read_dvc_file(project / f"{own}.dvc").md5 == status.md5 == verify(project, own)
    # The recorded world was not touched: same files, same times, still what data.dvc records.
    assert {p: p.stat().st_mtime_ns for p in world.rglob("*")} == before
    assert verify(project, "data") == recorded[1].md5
    # Both are found again where they are, and verified.
    assert ensure_world(project, "data", other, progress=False).action == "verified"
    assert ensure_world(project, "data", world_cfg(), progress=False).path == str(world)


def test_without_the_manifest_the_world_on_disk_decides(project, recorded):
    from fisao.world.store import world_data_dir

    (project / "data.md5").unlink()
    assert world_data_dir(project, "data", world_cfg()) == "data"
    assert world_data_dir(project, "data", world_cfg(seed=1)).startswith("data-world-")
    assert world_data_dir(project, "elsewhere", world_cfg(seed=1)) == "elsewhere"  # nothing recorded there yet


def test_without_the_manifest_the_mismatch_still_says_so(project):
    (project / "data.md5").unlink()
    (project / "data" / "world" / "vocab.txt").write_text("circle\n")
    with pytest.raises(DataMismatch, match=r"data\.md5 is missing, so the differing files cannot be named"):
        verify(project, "data")


def test_track_refuses_leftovers_of_an_interrupted_build(project):
    # A killed build leaves data/.world.tmp-*: DVC would hash it, verify skips it, so the
    # recorded version could never be verified again. Nothing is recorded.
    leftover = project / "data" / ".world.tmp-0123abcd"
    (leftover / "train").mkdir(parents=True)
    (leftover / "train" / ".x.tmp-0000ffff").write_text("half")
    before = (project / "data.dvc").read_text()
    with pytest.raises(RuntimeError, match=r"interrupted write: data/\.world\.tmp-0123abcd; delete them"):
        dvcdata.track(project, "data")
    assert (project / "data.dvc").read_text() == before
    assert verify(project, "data")  # the world itself is still the recorded one


def test_track_refuses_a_version_verify_could_not_match(project):
    (project / ".dvcignore").write_text("*.log\n")
    (project / "data" / "world" / "build.log").write_text("hidden from DVC, not from verify")
    with pytest.raises(RuntimeError, match=r"recorded .*\.dir, but the same \d+ files hash to .*check \.dvcignore"):
        dvcdata.track(project, "data")


def test_not_a_dvc_project(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a DVC project: run `dvc init` there"):
        ensure_world(tmp_path, "data", world_cfg(), progress=False)
    assert not (tmp_path / "data").exists()


def test_broken_dvc_and_manifest_files(tmp_path):
    (tmp_path / "data.dvc").write_text("outs: []\n")
    with pytest.raises(ValueError, match=r"data\.dvc is not a DVC file with an output md5.*git checkout data\.dvc"):
        read_dvc_file(tmp_path / "data.dvc")
    (tmp_path / "data.md5").write_text(f"{'0' * 32}  a.txt\nnot a line\n")
    with pytest.raises(ValueError, match=r"data\.md5:2: expected '<md5>  <path>'"):
        dvcdata.read_file_md5s(tmp_path / "data.md5")


def test_the_manifest_round_trips_and_matches_md5sum(tmp_path):
    entries = {"b/c.txt": "1" * 32, "a.txt": "2" * 32}
    dvcdata.write_file_md5s(tmp_path / "data.md5", entries)
    assert (tmp_path / "data.md5").read_text() == f"{'2' * 32}  a.txt\n{'1' * 32}  b/c.txt\n"
    assert dvcdata.read_file_md5s(tmp_path / "data.md5") == entries


def test_dvc_is_the_one_installed_beside_python():
    res = dvcdata.dvc(Path.cwd(), "--version")
    assert res.returncode == 0 and res.stdout.strip().startswith("3.")


def test_init_project_makes_a_git_and_dvc_project_with_analytics_off(tmp_path):
    project = dvcdata.init_project(tmp_path / "fresh")
    assert (project / ".git").is_dir() and (project / ".dvc").is_dir()
    config = (project / ".dvc" / "config").read_text()
    assert "analytics = false" in config and "check_update = false" in config
    # A second call on the same directory fails on `dvc init` (already a DVC project) and says so.
    with pytest.raises(RuntimeError, match="dvc init -q failed in"):
        dvcdata.init_project(project)
