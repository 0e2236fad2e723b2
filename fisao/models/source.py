"""Where a model comes from: a saved directory, or a hub id already in the Hugging Face cache.

Checked before anything heavy is imported or loaded, so a wrong path is one line at once
instead of a hub error ("Repo id must be in the form ...") after transformers has started.
"""
from __future__ import annotations

import re
from pathlib import Path

# A hub id: "name" or "owner/name", of letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_model_source(model: str | Path) -> None:
    """FileNotFoundError unless `model` is a directory with config.json or a cached hub id."""
    text, path = str(model), Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no model at {text} (expected a directory with config.json)")
        return
    if text.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(text):
        raise FileNotFoundError(f"no model at {text} (expected a directory with config.json)")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(text, "config.json"), str):
        raise FileNotFoundError(
            f"no model at {text}: no such directory, and the hub id {text} is not in the Hugging Face cache "
            f"(nothing is downloaded here; fetch it once where the hub is reachable: `huggingface-cli download {text}`)")
