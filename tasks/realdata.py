"""Tasks for real checkpoints and COCO: content ids of what the config points at, and the
memory check that runs before anything is loaded."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from fisao import io
from fisao.config import Config


def _model_ref(name: str) -> dict:
    """A local directory (sha256 of its files) or a hub id already in the HF cache (its commit)."""
    if Path(name).is_dir():
        return {"path": str(Path(name).resolve()), "sha256": io.tree_digest(name)}
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(name, local_files_only=True)
    except Exception as e:  # the hub's errors differ by version; all mean "not in the cache"
        raise FileNotFoundError(f"{name} is neither a directory nor in the Hugging Face cache; download it once "
                                f"where the hub is reachable (huggingface-cli download {name})") from e
    return {"path": path, "sha256": f"hub:{name}@{Path(path).name}"}


def _data_ref(cfg: Config) -> dict:
    from fisao.examples import coco_fingerprint

    root = Path(cfg.data.root).resolve()
    return {"path": str(root), "md5": coco_fingerprint(root), "action": "given"}


@task(name="real-data")
def real_data(cfg: Config) -> dict:
    """The COCO directory's ref: its path and fingerprint (what `dvc add` recorded, if it did)."""
    return _data_ref(cfg)


@task(name="real-models")
def real_models(cfg: Config) -> dict:
    """Refs (path, sha256) of the policy and the verifier, and a fingerprint of the COCO directory."""
    return {"policy": _model_ref(cfg.model.policy), "verifier": _model_ref(cfg.model.verifier), "data": _data_ref(cfg)}


@task(name="memory-check")
def memory_check(cfg: Config, policy_dir: str) -> dict:
    """Print what the campaign needs; stop before loading anything when it cannot fit."""
    from fisao.memory import available_memory, campaign_estimate, check_fits, report
    from fisao.runtime import runtime_device

    m = cfg.model
    est = campaign_estimate(cfg, policy_dir)
    available, where = ((int(m.memory_gib * 1024 ** 3), f"model.memory_gib ({m.memory_gib})") if m.memory_gib
                        else available_memory(runtime_device(m)))
    get_run_logger().info("what this campaign needs:\n%s", report(est, where, available))
    check_fits(est, available, where)
    return est.to_json()
