"""What a flow passes to a task: small frozen references, so a call names what it passes.

- `DataRef(path, md5)`: a data directory and its content id (the DVC md5, or COCO's fingerprint).
- `ModelRef(path, sha256, adapter)`: a checkpoint directory, the sha256 of its files, and the
  LoRA adapter it was merged from (None for a base model).
- `StageRef(path, sha256)`: a finished stage's output directory (rollouts, scores, calibration).
- `StageContext(code, outputs, runtime)`: what every call of one kind of stage repeats: the code
  version of the library it runs, where its outputs go, and the real-model runtime (None: the
  shapes world).

A stage's output directory is named by a key over the refs' content (their md5 and sha256) and
the context's `key_parts`, never by a path or an id (how, in tasks/common.py). Tasks return plain
JSON dicts (a ref plus the stage's figures and `cached`); `ModelRef.of(result)` and
`StageRef.of(result)` take the fields a later stage needs.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from fisao.config import ModelConfig, config_hash


def _require(ref, *names: str) -> None:
    for name in names:
        value = getattr(ref, name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{type(ref).__name__}.{name} must be a non-empty string, got {value!r}; pass the "
                             f"{name} of the directory (the `{name}` of the task result it comes from)")


class _Ref:
    """What the refs share: their `required` fields are checked, and `of(result)` takes them (and
    the optional ones) from a task's result dict, leaving its figures out."""

    required: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        _require(self, *self.required)

    @classmethod
    def of(cls, result: dict):
        return cls(**{f.name: result.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class DataRef(_Ref):
    """A data directory (`path`) and its content id (`md5`): `DataRef.of` a world or COCO dict."""

    required = ("path", "md5")
    path: str
    md5: str


@dataclass(frozen=True)
class ModelRef(_Ref):
    """A checkpoint directory (`path`), the sha256 of its files, and its LoRA adapter (None: a base
    model): `ModelRef.of` a build's or an update's result."""

    required = ("path", "sha256")
    path: str
    sha256: str
    adapter: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.adapter is not None:
            _require(self, "adapter")


@dataclass(frozen=True)
class StageRef(_Ref):
    """A finished stage's output directory (`path`) and the sha256 of its files: `StageRef.of` a
    stage's result."""

    required = ("path", "sha256")
    path: str
    sha256: str


@dataclass(frozen=True)
class StageContext:
    """What every call of one kind of stage repeats: its library's code version (`code`), the
    directory its outputs go under (`outputs`) and the real-model runtime (None: the shapes world)."""

    code: str
    outputs: str
    runtime: ModelConfig | None = None

    def __post_init__(self):
        _require(self, "code", "outputs")

    @property
    def key_parts(self) -> tuple:
        """What a stage's key (tasks/common.py) takes from the context: the code version, then the
        runtime's config hash (nothing for the shapes world, whose keys stay as they were)."""
        return (self.code,) if self.runtime is None else (self.code, config_hash(self.runtime))
