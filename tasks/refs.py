"""What a flow passes to a task: small frozen references, so a call names what it passes.

- `DataRef(path, md5)`: a data directory and its content id (the DVC md5, or COCO's fingerprint).
- `ModelRef(path, sha256, adapter)`: a checkpoint directory, the sha256 of its files, and the
  LoRA adapter it was merged from (None for a base model).
- `StageRef(path, sha256)`: a finished stage's output directory (rollouts, scores, calibration).
- `StageContext(code, outputs, runtime)`: what every call of one kind of stage repeats: the code
  version of the library it runs, where its outputs go, and the real-model runtime (None: the
  shapes world).

Cache keys stay content-based: Prefect's INPUTS policy hashes these as JSON of their fields (a
frozen dataclass of strings and a pydantic section), and the output directories are named by
`key_of` over the same hashes and md5s as before (tasks/common.py), never by a path or an id.
Tasks return plain JSON dicts (a ref plus the stage's figures); `ModelRef.of(result)` and
`StageRef.of(result)` take the fields a later stage needs.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from fisao.config import ModelConfig


def _require(ref, *names: str) -> None:
    for name in names:
        value = getattr(ref, name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{type(ref).__name__}.{name} must be a non-empty string, got {value!r}; pass the "
                             f"{name} of the directory (the `{name}` of the task result it comes from)")


def _pick(cls, result: dict):
    return cls(**{f.name: result.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class DataRef:
    """A data directory (`path`) and its content id (`md5`)."""

    path: str
    md5: str

    def __post_init__(self):
        _require(self, "path", "md5")

    @classmethod
    def of(cls, result: dict) -> "DataRef":
        """The ref of a world or COCO directory dict (path, md5, and anything else)."""
        return _pick(cls, result)


@dataclass(frozen=True)
class ModelRef:
    """A checkpoint directory (`path`), the sha256 of its files, and its LoRA adapter (None: a base model)."""

    path: str
    sha256: str
    adapter: str | None = None

    def __post_init__(self):
        _require(self, "path", "sha256")
        if self.adapter is not None:
            _require(self, "adapter")

    @classmethod
    def of(cls, result: dict) -> "ModelRef":
        """The ref of a build's or an update's result (its figures left out)."""
        return _pick(cls, result)


@dataclass(frozen=True)
class StageRef:
    """A finished stage's output directory (`path`) and the sha256 of its files."""

    path: str
    sha256: str

    def __post_init__(self):
        _require(self, "path", "sha256")

    @classmethod
    def of(cls, result: dict) -> "StageRef":
        """The ref of a stage's result (its figures left out)."""
        return _pick(cls, result)


@dataclass(frozen=True)
class StageContext:
    """What every call of one kind of stage repeats: its library's code version (`code`), the
    directory its outputs go under (`outputs`) and the real-model runtime (None: the shapes world)."""

    code: str
    outputs: str
    runtime: ModelConfig | None = None

    def __post_init__(self):
        _require(self, "code", "outputs")
