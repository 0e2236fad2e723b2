"""A campaign's inputs: the data version and the resolved config that its rounds were trained on.

Resuming a campaign must not mix versions silently. What identifies the inputs is the data md5
(from `data.dvc`) and the hash of the resolved config without the two keys that name or extend
a campaign (`name`, `ppo.rounds`): "one more round" is the same campaign, a new learning rate is
not. `changes` says, key by key, what differs between the recorded inputs and the current ones.
"""
from __future__ import annotations

import hashlib
import json

from fisao.config import Config

# Keys that may differ between runs of one campaign: its name and how many rounds it aims for.
CAMPAIGN_KEYS = ("name", "ppo.rounds")


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists and tuples stay values)."""
    out: dict[str, object] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def identity(cfg: Config) -> dict[str, object]:
    """The resolved config as dotted keys, without the campaign's name and round count."""
    flat = flatten(cfg.model_dump(mode="json"))
    return {k: v for k, v in flat.items() if k not in CAMPAIGN_KEYS}


def config_identity_hash(cfg: Config) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def changes(recorded: dict, current: dict, show: int = 8) -> list[str]:
    """Lines naming what differs between two input records ({"data_md5", "config": dotted})."""
    lines = []
    if recorded["data_md5"] != current["data_md5"]:
        lines.append(f"data: md5 {recorded['data_md5']} -> {current['data_md5']} (data.dvc)")
    old, new = recorded["config"], current["config"]
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    for key in keys[:show]:
        lines.append(f"config: {key} {json.dumps(old.get(key, '<unset>'))} -> {json.dumps(new.get(key, '<unset>'))}")
    if len(keys) > show:
        lines.append(f"config: and {len(keys) - show} more keys")
    return lines
