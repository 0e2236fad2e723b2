"""Campaign configuration: one YAML file, validated once into frozen pydantic models.

The `world` section lives in fisao/world/config.py; the others are below.
Every section rejects unknown keys and wrong types with the YAML file's name and the key's
dotted path, so a typo stops the run before anything is built.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fisao.world.config import Split, WorldConfig

__all__ = ["ClipBuildConfig", "LlavaBuildConfig", "EvalConfig", "RolloutConfig",
           "LoraConfig", "PPOConfig", "RewardConfig", "ModelConfig", "DataConfig", "ScaleConfig", "Config",
           "config_hash", "load_config"]


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf` (and NaN) are refused in every float, bounded or not.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ClipBuildConfig(_Strict):
    """The tiny CLIP (the verifier, and the policy's vision tower)."""

    # Equal to world.cell for the grid layout: one shape, one vision token.
    patch_size: int = 16
    width: int = 96
    layers: int = 3
    heads: int = 4
    text_width: int = 96
    text_layers: int = 2
    projection_dim: int = 64
    vocab_size: int = 512
    # Captions are cut to this many tokens in CLIP training (the first objects of a caption carry
    # its content; the text tower's cost grows with length). Name prompts are far shorter.
    max_text_tokens: int = Field(40, ge=8, le=77)
    # 2400 steps: object-name AUROC on test 1.000 (0.971 at 1200), and on the policy's own
    # mentions 1.00 (0.92 at 1200), measured on world seed 0.
    steps: int = 2400
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    # Weight of the multi-label image <-> object-name loss against the caption InfoNCE loss.
    name_loss_weight: float = 1.0
    # The caption InfoNCE runs on the first `caption_batch_size` images of each batch: the text
    # tower over whole captions is the costly part of a step, and the verifier scores names.
    caption_loss_weight: float = Field(0.1, ge=0)
    caption_batch_size: int = Field(16, ge=2)
    # Stop training once the object-name AUROC on the val split reaches this (checked every
    # `check_every` steps); None trains all `steps`. CLIP on photographs is far from perfect: a
    # verifier built to a set accuracy makes every world seed's verifier as fallible as the next,
    # by construction rather than by how hard a seed's scenes happen to be.
    target_auroc: float | None = Field(0.9, gt=0.5, le=1.0)
    check_every: int = Field(100, ge=1)
    seed: int = 0


class LlavaBuildConfig(_Strict):
    """The tiny LLaVA built on the CLIP's vision tower, trained on captions and questions."""

    width: int = 128
    layers: int = 2
    heads: int = 4
    # Which CLIP layer the LLaVA reads: LLaVA-1.5 takes the penultimate of 24; of the world's 3,
    # the last is the one that knows the objects (measured, 1200 steps: with -2 the yes/no
    # answers stayed at chance for one LLaVA seed of two; with -1 both reached AUROC 0.96-0.98).
    vision_feature_layer: int = Field(-1, le=-1)
    steps: int = 1200
    batch_size: int = 32
    # 2e-3 learnt the yes/no answers for some LLaVA seeds only on the hard world (val yes/no AUROC
    # 0.51 for seed 0 on world 1, 0.81 for seed 1); 1e-3 learnt them for all three tried (0.83-0.89).
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Share of training examples that are yes/no questions (the rest are detailed captions). A yes/no
    # answer is decided by one token, a caption by many: at 0.5 the answers stayed at chance
    # (POPE accuracy 0.50 on val after 800 and 1600 steps); at 0.75 they were learnt.
    question_share: float = Field(0.75, ge=0, le=1)
    # How a batch's token losses are averaged. `token`: over all answer tokens, so the one word that
    # decides a yes/no answer is ~5% of the loss and on harder worlds the answers stayed at chance
    # (measured: yes/no AUROC 0.51 on val, POPE yes-ratio 1.00, with a CLIP trained to 0.92). `kinds`:
    # the captions' tokens, the questions' deciding words and the questions' other tokens each
    # have their own mean, weighed equally.
    loss_mean: Literal["token", "kinds"] = "kinds"
    seed: int = 0


class EvalConfig(_Strict):
    """How models are evaluated (prompts follow the usual CHAIR/POPE protocols)."""

    caption_prompt: str = "Please describe this image in detail."
    max_new_tokens: int = Field(64, ge=1)
    # POPE and MME need only the first words of an answer.
    pope_max_new_tokens: int = Field(12, ge=1)
    # Greedy answers per generate call. On the demo's base model every CHAIR and POPE figure was the
    # same at 64, 128 and 256, and 256 the fastest on 2 cores (8.3-8.5 s against 9.3-10.3 s at 64);
    # the configs of real checkpoints set their own (8-16 on one GPU).
    batch_size: int = Field(256, ge=1)
    # Evaluate on N images (None: all): the first N of a world split, a seeded sample of COCO.
    limit: int | None = Field(None, ge=1)
    seed: int = 0
    split: Split = "test"


class RolloutConfig(_Strict):
    """Sampling the policy's answers on training images, once per round."""

    # The image pool: FiSAO needs images only (ground truth is used for the audit, never for the
    # reward). "pretrain" has the weak pair prior of unseen images; on "train", whose prior the
    # policy learnt, it rarely hallucinates (measured: 5.7% of rollout mentions against 24% on val).
    split: Literal["train", "pretrain"] = "pretrain"
    # 256, chosen on val of worlds 0-2 (3 rounds): CHAIR_i -16%, -19%, -18%, recall -0.4, -3.4, -2.7
    # points, POPE adversarial F1 -0.8, +1.3, -1.1, KL at most 2.7, where 128 gave -5%, -11%, -15%
    # (recall -12.2, -1.5, -6.3). 1024 ran away within a round (KL 133, POPE yes-ratio 0.96); with
    # 64-answer steps and ppo.target_kl 0.05 it gave -24%, -6%, -33% (a higher mean, a worse worst
    # run, a KL of 9.7): not taken. docs/method.md has the val table.
    images_per_round: int = Field(256, ge=1)
    n_per_image: int = Field(4, ge=1)
    # The logged log-probs are the policy's own (temperature 1, full softmax): with temperature 1
    # and top_p 1 the rollouts are exactly on-policy for PPO; other values sample from a warped
    # policy and the importance ratio ignores the difference (see fisao/align/rollout.py).
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    prompt: str = "Describe this image in detail."
    # Also ask this many yes/no questions per image, about objects of the vocabulary drawn at
    # random (no ground truth): the answer's yes/no is a claim the verifier rewards like a mention.
    # Measured on val (3 rounds): 2 kept recall and POPE where captions alone cost POPE 3 points.
    questions_per_image: int = Field(2, ge=0)
    question_template: str = "Is there a {} in the image?"
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "RolloutConfig":
        if "{}" not in self.question_template:
            raise ValueError(f"rollout.question_template must hold '{{}}' where the object name goes, "
                             f"got {self.question_template!r}")
        return self


class LoraConfig(_Strict):
    """LoRA adapters on the language model (the vision tower is the verifier and stays frozen)."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Module names inside the language model only (a regex built from them keeps the vision
    # tower's projections of the same names out).
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # Also adapt the vision-to-language projector (LoRA on its linear layers).
    train_projector: bool = False

    @model_validator(mode="after")
    def _check(self) -> "LoraConfig":
        if not self.target_modules or not all(n.isidentifier() for n in self.target_modules):
            raise ValueError(f"lora.target_modules must be module names such as q_proj, got {list(self.target_modules)}")
        return self


class PPOConfig(_Strict):
    """The policy update: PPO-clip over tokens with the per-token reward r_t − β·KL_t."""

    # Measured on the demo (3 rounds, 128 images x 4 answers): 1e-3 cut CHAIR_i 0.211 -> 0.171 at
    # KL 0.4; 2e-3 with 256 images reached 0.153 but lost 8 points of recall and the KL blew up (8.2);
    # 3e-3 collapsed the policy within one round.
    lr: float = Field(1e-3, gt=0)
    beta_kl: float = Field(0.05, ge=0)
    # Weight of a k3 KL(π ‖ π_ref) term in the loss, recomputed as π moves: it holds back the tokens
    # that carry no reward, which the reward's KL (fixed at sampling time) never reaches.
    kl_loss_coef: float = Field(0.0, ge=0)
    # What that term measures at each response position: "k3", the estimate at the sampled token;
    # "full", the exact KL over the whole vocabulary (one more forward, adapters off, per micro-batch),
    # which also sees probability moving onto tokens that were never sampled.
    kl_loss_estimator: Literal["k3", "full"] = "k3"
    # Weight of the name-slot loss (fisao/align/ppo.py `name_slot_loss`, slots from
    # fisao/align/rewards.py `name_slots`): where a rollout first names an object, every name's verifier
    # reward on the image, not only the sampled name's. 0: off, the paper's update. Off because on val
    # (worlds 0-2 x seeds 0-2) it kept recall better but cut no more, with a smaller smallest cut and one
    # round's yes-ratio past 0.65; the figures, and the held-out ones, are in docs/method.md ("Name slots").
    name_slot_coef: float = Field(0.0, ge=0)
    # "distill": KL(softmax(reward / name_slot_temperature) || policy) over the names; "expected": minus
    # the names' expected reward (on val it let "No"/"Yes" into the name slot).
    name_slot_target: Literal["expected", "distill"] = "distill"
    name_slot_temperature: float = Field(0.25, gt=0)
    clip: float = Field(0.2, gt=0, lt=1)
    value_clip: float = Field(0.2, gt=0)
    # Weight of the value loss (shares the LoRA backbone with the policy); "gae" only.
    value_coef: float = Field(0.1, ge=0)
    # gamma and lam are used by "gae" only; "critic_free" is gamma = 0 by definition.
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    advantage: Literal["gae", "critic_free"] = "critic_free"
    whiten: bool = True
    epochs: int = Field(2, ge=1)
    # Early stop of a round's update (as SpinningUp's and Stable-Baselines3's PPO): no more optimizer
    # steps once the mean approx_kl of the last step (KL(π_old ‖ π), π_old the policy that sampled)
    # passes 1.5 × target_kl. None: every step of every epoch runs.
    target_kl: float | None = Field(None, gt=0)
    # Rows per forward pass; one optimizer step covers minibatch_size * grad_accum rows.
    minibatch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    # "base": the model with adapters disabled; "previous": the policy that sampled this round.
    reference: Literal["base", "previous"] = "base"
    # 0: the base model, its evaluation and the verifier's calibration only (as `--rounds 0`).
    rounds: int = Field(3, ge=0)
    seed: int = 0


class RewardConfig(_Strict):
    """How the verifier's scores become rewards (see fisao/align/rewards.py)."""

    # "token": each mention's reward on its tokens; "sentence": one score of the whole answer
    # on its last token (the ablation).
    level: Literal["token", "sentence"] = "token"
    # "continuous": clamp((s - b) / w, -1, 1); "binary": sign(s - b).
    shape: Literal["continuous", "binary"] = "continuous"
    # Which tokens carry a mention's reward: "mention", its name's; "phrase", also the words that
    # led to it since the previous mention, at most `span_words` of them ("and a blue square").
    span: Literal["mention", "phrase"] = "mention"
    span_words: int = Field(3, ge=0)
    # "each": every mention keeps its reward; "first": a repeated category earns at most 0.
    # "each" let the policy farm reward by naming a present object again and again (recall fell
    # 13 points on val); "first" does not pay for repeats.
    repeats: Literal["each", "first"] = "first"
    # Read a word with a token glued onto it as its parts ("starNo": a star), as CHAIR does not.
    # False (CHAIR's reading): after an update that glued "No"/"Yes" onto names, those names earned
    # no reward, so nothing pushed them down; on val, of seven runs one collapsed POPE and one rose
    # (docs/method.md, "Glued words").
    split_glued: bool = True
    # What a yes/no question's object reward is measured against (fisao/align/rewards.py
    # QUESTION_BASELINES): "none", the verifier's reward as is; "mean", minus its mean over the
    # round's questions, so that a constant yes or no earns nothing on average. Chosen on val of
    # worlds 0, 1, 2 (3 rounds, the hard world): with "none" the hallucinated third of the mentions
    # made the mean object reward negative and "no" paid, POPE adversarial F1 fell 5.4, 6.0 and 7.5
    # points (yes-ratio down to 0.34); with "mean" it moved -1.1, -1.2, +1.1 and the CHAIR_i cut
    # was no smaller (-5%, -15%, -11% against +2%, -18%, -6%).
    question_baseline: Literal["none", "mean"] = "mean"
    per_class: bool = False
    # Who scores the mentions: "clip", the policy's own CLIP (FiSAO); "oracle", ground truth (score 1
    # when the object is in the image, 0 when not; baseline 0.5, width 0.5), the ablation that
    # shows what a perfect verifier would teach. It needs ground truth on the rollout split.
    verifier: Literal["clip", "oracle"] = "clip"
    template: str = "a photo of a {}."
    # Stop (instead of warning) when the policy's vision tower is not the verifier's vision model.
    require_same_vision: bool = True
    # Calibration: the base policy's answers on this split, `calibration_answers` per image.
    calibration_split: Split = "val"
    calibration_images: int = Field(200, ge=1)
    calibration_answers: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "RewardConfig":
        if "{}" not in self.template:
            raise ValueError(f"reward.template must hold '{{}}' where the object name goes, got {self.template!r}")
        if self.verifier == "oracle" and self.level == "sentence":
            raise ValueError("reward.verifier 'oracle' scores mentions (ground truth per object); "
                             "reward.level 'sentence' scores whole answers with CLIP: use one or the other")
        return self


class ModelConfig(_Strict):
    """Policy and verifier given by hub id or local directory, instead of the world's built models.

    Nothing is downloaded: with HF_HUB_OFFLINE=1 a hub id must already be in the Hugging Face
    cache (`huggingface-cli download llava-hf/llava-1.5-7b-hf` once, where the hub is reachable).
    """

    policy: str
    verifier: str
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    gradient_checkpointing: bool = True
    trust_remote_code: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Memory the campaign may use, in GiB; None: detected (free GPU memory, or available RAM on CPU).
    memory_gib: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        for key in ("policy", "verifier"):
            if not getattr(self, key).strip():
                raise ValueError(f"model.{key} is empty: give a hub id (llava-hf/llava-1.5-7b-hf) or a directory")
        return self


class DataConfig(_Strict):
    """Where real data lives (fisao/examples.py describes the COCO layout)."""

    kind: Literal["coco"] = "coco"
    root: str


class ScaleConfig(_Strict):
    """Scale-out: processes for `accelerate launch`, rollout shards, the rollout backend."""

    # Processes the policy update and rollout generation run on; > 1 starts `accelerate launch`.
    processes: int = Field(1, ge=1)
    # Rollouts are sampled in this many shards and gathered; None: one per process. On one process
    # the shards run one after another; on P processes each samples rollout_shards / P of them
    # (fisao/align/launch.py). The rollouts depend on the shard count only, never on `processes`.
    rollout_shards: int | None = Field(None, ge=1)
    # "hf": transformers' generate with the KV cache (fisao/align/backends.py; a vLLM backend plugs in there).
    rollout_backend: Literal["hf"] = "hf"

    @model_validator(mode="after")
    def _check(self) -> "ScaleConfig":
        if self.shards % self.processes:
            raise ValueError(f"scale.rollout_shards ({self.rollout_shards}) must be a multiple of scale.processes "
                             f"({self.processes}), so that every process samples as many shards; leave it unset "
                             "for one shard per process")
        return self

    @property
    def shards(self) -> int:
        """How many shards a round's rollouts are sampled in."""
        return self.processes if self.rollout_shards is None else self.rollout_shards


# A campaign name is one path component (outputs/campaigns/NAME/) and an MLflow experiment name.
NAME_CHARACTERS = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_campaign_name(name: str) -> str:
    """`name` if it is safe as one path component, else a ValueError saying which names are."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"campaign name {name!r} is not allowed: use {NAME_CHARACTERS} (e.g. demo-2)")
    return name


class Config(_Strict):
    """A whole campaign: world, base models, evaluation."""

    name: str = "demo"
    data_dir: str = "data"
    outputs_dir: str = "outputs"
    world: WorldConfig = WorldConfig()
    clip: ClipBuildConfig = ClipBuildConfig()
    llava: LlavaBuildConfig = LlavaBuildConfig()
    eval: EvalConfig = EvalConfig()
    rollout: RolloutConfig = RolloutConfig()
    lora: LoraConfig = LoraConfig()
    ppo: PPOConfig = PPOConfig()
    reward: RewardConfig = RewardConfig()
    # Real models and data (both or neither); without them the campaign builds the shapes world.
    model: ModelConfig | None = None
    data: DataConfig | None = None
    scale: ScaleConfig = ScaleConfig()

    _name = field_validator("name")(check_campaign_name)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if (self.model is None) != (self.data is None):
            raise ValueError("model and data go together: real models need real data (data: {kind: coco, root: ...}), "
                             "and the shapes world builds its own models (remove both to run the world)")
        if self.data is not None and self.rollout.split != "train":
            raise ValueError(f"rollout.split {self.rollout.split!r} is the world's; on COCO rollouts use train (train2014)")
        return self

    @property
    def world_dir(self) -> Path:
        return Path(self.data_dir) / "world"


def config_hash(section: BaseModel) -> str:
    """A short, stable hash of a config section (part of every cache key)."""
    blob = json.dumps(section.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Read a YAML campaign config (or the defaults when `path` is None) and validate it."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist; see configs/ for examples")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                             "save it as UTF-8") from e
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from e
        if data is None:
            raise ValueError(f"config file {path} is empty (no keys, only blanks or comments): write the settings to "
                             "change (configs/demo.yaml lists them), or pass no --config")
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        where = f"config file {path}" if path is not None else "config (built-in defaults and overrides)"
        lines = [f"invalid {where}:"]
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key (remove it or check the spelling)")
            elif err["type"] == "value_error":  # our validators' messages start with the dotted key
                msg = str(err["ctx"]["error"])
                lines.append(f"  {msg}" if msg.startswith(f"{key}.") else f"  {key}: {msg}")
            else:
                lines.append(f"  {key}: {err['msg']}")
        raise ValueError("\n".join(lines)) from e


def _set_dotted(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ValueError(f"{dotted!r} is not a dotted key such as ppo.rounds")
    node = data
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted}: {'.'.join(parts[:i + 1])} is a value, not a section")
    node[parts[-1]] = value


def parse_settings(pairs: list[str]) -> dict:
    """`KEY=VALUE` strings (the command line's `--set`) -> {dotted key: value}.

    VALUE is read as YAML, as in a config file: `ppo.rounds=1`, `ppo.beta_kl=0.1`,
    `world.sizes={train: 48, val: 16, test: 12}`, `rollout.prompt=Describe it.`"""
    out: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE with a dotted key, e.g. --set ppo.rounds=1")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError as e:
            raise ValueError(f"--set {pair!r}: the value is not valid YAML ({e.problem or e})") from e
    return out
