"""Lightning callbacks of qgen, referenced in YAML as ``callbacks.<Name>`` under ``trainer.callbacks``."""

from callbacks.rewards import DifficultyReward, DiversityReward, NoveltyReward, RewardCallback, RigorReward
from callbacks.samples import SampleTextCallback

__all__ = [
    "DifficultyReward",
    "DiversityReward",
    "NoveltyReward",
    "RewardCallback",
    "RigorReward",
    "SampleTextCallback",
]
