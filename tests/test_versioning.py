"""Stage code versions: derived from what a stage's entry modules import, so editing any module a
stage uses changes its cache key, and a module a stage does not use leaves it alone."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fisao.versioning import NEUTRAL, PACKAGE_ROOT, code_version, stage_files

FAKE = {
    "__init__.py": "",
    "a.py": "import os\n\ndef f():\n    from fisao import b  # a lazy import runs too\n    return b\n",
    "b.py": "from .sub import e\nfrom . import c\n",
    "c.py": "from fisao.sub.deep import g\n",
    "d.py": "import fisao.c  # nobody imports d\n",
    "neutral.py": "import fisao.d\n",
    "sub/__init__.py": "",
    "sub/e.py": "from ..neutral import x\n",
    "sub/deep/__init__.py": "from . import g\n",
    "sub/deep/g.py": "",
}


@pytest.fixture
def fake(tmp_path) -> Path:
    for name, text in FAKE.items():
        path = tmp_path / "fisao" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "fisao"


def test_stage_files_follow_every_import_statement_transitively(fake):
    assert stage_files("fisao.a", neutral=(), root=fake) == (
        "__init__.py", "a.py", "b.py", "c.py", "d.py", "neutral.py", "sub/__init__.py", "sub/deep/__init__.py",
        "sub/deep/g.py", "sub/e.py")


def test_neutral_files_are_neither_hashed_nor_followed(fake):
    # neutral.py is the only way to d.py: leaving it out leaves d.py out too.
    assert stage_files("fisao.a", neutral=("neutral.py",), root=fake) == (
        "__init__.py", "a.py", "b.py", "c.py", "sub/__init__.py", "sub/deep/__init__.py", "sub/deep/g.py", "sub/e.py")


def test_an_entry_that_is_no_module_is_an_error(fake):
    with pytest.raises(ValueError, match="'fisao.nope' is no module of fisao"):
        stage_files("fisao.nope", root=fake)


STAGES = {
    "model": ("fisao.world.store", "fisao.models.build"),
    "eval": ("fisao.evaluate",),
    "align": ("fisao.align.sample", "fisao.align.score", "fisao.align.train", "fisao.align.launch", "fisao.align.shards"),
}


def test_the_flows_use_the_derived_files():
    from flows.rounds import ALIGN_CODE, EVAL_CODE, MODEL_CODE

    assert (MODEL_CODE, EVAL_CODE, ALIGN_CODE) == tuple(stage_files(*STAGES[s]) for s in ("model", "eval", "align"))
    # Modules the hand-kept lists missed are in; the real-model parts the world's builds never run are not.
    assert "models/source.py" in EVAL_CODE and "models/source.py" in ALIGN_CODE and "world/text.py" in EVAL_CODE
    assert "models/eva_clip.py" not in MODEL_CODE and "models/known.py" not in MODEL_CODE
    assert not any(f.startswith(("peers/", "audit/")) for f in (*MODEL_CODE, *EVAL_CODE, *ALIGN_CODE))
    assert not set(NEUTRAL) & set(MODEL_CODE + EVAL_CODE + ALIGN_CODE)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_editing_any_module_a_stage_uses_changes_its_key_and_no_other_module_does(stage, tmp_path):
    root = tmp_path / "fisao"
    shutil.copytree(PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    files = stage_files(*STAGES[stage], root=root)
    key = code_version(*files, root=root)
    assert key == code_version(*stage_files(*STAGES[stage])) and len(files) > 5
    for name in files:
        path = root / name
        before = path.read_bytes()
        path.write_bytes(before + b"\n# an edit\n")
        assert code_version(*stage_files(*STAGES[stage], root=root), root=root) != key, name
        path.write_bytes(before)
    unused = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                    if p.relative_to(root).as_posix() not in files)
    assert "peers/grpo.py" in unused and "config.py" in unused
    for name in unused:
        (root / name).write_bytes((root / name).read_bytes() + b"\n# an edit\n")
    assert code_version(*stage_files(*STAGES[stage], root=root), root=root) == key


def test_a_module_newly_imported_by_a_stage_joins_its_key(tmp_path):
    root = tmp_path / "fisao"
    shutil.copytree(PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "helper.py").write_text("X = 1\n")
    key = code_version(*stage_files("fisao.evaluate", root=root), root=root)
    evaluate = root / "evaluate.py"
    evaluate.write_text(evaluate.read_text() + "\n\ndef uses_helper():\n    from fisao.helper import X\n    return X\n")
    files = stage_files("fisao.evaluate", root=root)
    assert "helper.py" in files
    (root / "helper.py").write_text("X = 2\n")
    assert code_version(*files, root=root) != key
