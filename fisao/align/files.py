"""The file names in a round's stage directories, shared by the stages that write them and the code that reads them."""
from __future__ import annotations

# Every stage's figures (a small JSON dict), written last in the stage's atomic directory: a
# directory holding it is complete.
FIGURES = "figures.json"
# Calibration: mention- and sentence-level (b, w, AUROC), and the histogram of the scores.
CALIBRATION = "calibration.json"
HISTOGRAM = "scores.png"
# Scores: per-token rewards (N, T) of the round's rollouts, and one JSON row per rollout.
TOKEN_REWARDS = "token_rewards.safetensors"
REWARDS = "rewards.jsonl"
