"""Round manifests: every file's sha256 and size; damage is named file by file."""
from __future__ import annotations

from fisao import io
from fisao.manifest import build_manifest, group_digest, verify_files, verify_manifest


def make_round(root):
    model = root / "rounds" / "abc" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\x01" * 1000)
    (model / "config.json").write_text('{"a": 1}')
    rewards = root / "scores" / "rewards.jsonl"
    rewards.parent.mkdir()
    rewards.write_text('{"row": 0}\n')
    return model, rewards


def test_intact_round_verifies_and_group_digest_is_the_checkpoint_hash(tmp_path):
    model, rewards = make_round(tmp_path)
    manifest = build_manifest({"model": (model, model.parent), "rewards": rewards})
    assert verify_manifest(manifest) == []
    assert group_digest(manifest["groups"]["model"]) == io.tree_digest(model)
    assert manifest["groups"]["model"]["stage_dir"] == str(model.parent.resolve())
    assert manifest["groups"]["model"]["files"]["model.safetensors"]["size"] == 1000


def test_truncated_modified_missing_and_unexpected_files_are_named(tmp_path):
    model, rewards = make_round(tmp_path)
    manifest = build_manifest({"model": (model, model.parent), "rewards": rewards})
    with open(model / "model.safetensors", "r+b") as f:
        f.truncate(400)
    (model / "config.json").write_text('{"a": 2}')
    (model / "extra.bin").write_bytes(b"x")
    rewards.unlink()
    problems = {p.path: p for p in verify_manifest(manifest)}
    assert problems[str(model.resolve() / "model.safetensors")].what == "truncated (400 of 1000 bytes)"
    assert problems[str(model.resolve() / "config.json")].what.startswith("modified")
    assert problems[str(model.resolve() / "extra.bin")].what.startswith("unexpected")
    assert problems[str(rewards.resolve())].what == "missing"
    # The whole directory the update stage wrote goes when its checkpoint is damaged.
    assert {p.stage_dir for p in problems.values() if p.group == "model"} == {str(model.parent.resolve())}
    assert verify_manifest(manifest, groups=("rewards",)) == [problems[str(rewards.resolve())]]


def test_a_downloaded_copy_is_checked_against_the_same_entry(tmp_path):
    model, _ = make_round(tmp_path)
    manifest = build_manifest({"model": model})
    copy = tmp_path / "download" / "model"
    copy.mkdir(parents=True)
    (copy / "config.json").write_text('{"a": 1}')
    assert [p.what for p in verify_files(manifest["groups"]["model"], copy, "model")] == ["missing"]
    (copy / "model.safetensors").write_bytes(b"\x01" * 1000)
    assert verify_files(manifest["groups"]["model"], copy, "model") == []
