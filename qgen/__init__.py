"""qgen: a PyTorch Lightning trainer for LLMs that write exam questions (competition maths and gaokao)."""

from qgen.data import QuestionDataModule
from qgen.distill import DistillModule
from qgen.grpo import GRPOModule
from qgen.sft import SFTModule

__all__ = ["DistillModule", "GRPOModule", "QuestionDataModule", "SFTModule"]
__version__ = "0.1.0"
