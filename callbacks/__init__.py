"""Lightning callbacks of qgen, referenced in YAML as ``callbacks.<Name>`` under ``trainer.callbacks``."""

from callbacks.guards import FiniteGuard, HangWatchdog, NonFiniteError
from callbacks.judges import EducationalValueJudge, OpenAIJudge
from callbacks.memory import MemoryMonitor
from callbacks.predictions import PredictionWriter
from callbacks.rewards import (
    DifficultyReward,
    DiversityReward,
    NoveltyReward,
    RepetitionReward,
    RewardCallback,
    RigorReward,
)
from callbacks.samples import SampleTextCallback
from callbacks.solver import ServedSolver, ServedSolverDifficulty, SolverDifficulty

__all__ = [
    "DifficultyReward",
    "DiversityReward",
    "EducationalValueJudge",
    "FiniteGuard",
    "HangWatchdog",
    "MemoryMonitor",
    "NonFiniteError",
    "NoveltyReward",
    "OpenAIJudge",
    "PredictionWriter",
    "RepetitionReward",
    "RewardCallback",
    "RigorReward",
    "SampleTextCallback",
    "ServedSolver",
    "ServedSolverDifficulty",
    "SolverDifficulty",
]
