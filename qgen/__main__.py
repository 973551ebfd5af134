"""``python -m qgen``: the LightningCLI stages (fit / validate / test / predict) plus four plain commands.

- ``score``: model-free scoring and contamination report of a question file (:mod:`qgen.score`);
- ``export``: a checkpoint as a PEFT adapter or merged model folder (:mod:`qgen.export`);
- ``pipeline``: SFT -> GRPO -> distillation on the embedded default, then sample questions (:mod:`qgen.pipeline`);
- ``plan``: per-GPU memory of a config on N GPUs, per sharding strategy, without loading weights (:mod:`qgen.plan`).
"""

import importlib
import sys

COMMANDS = {"score": "qgen.score", "export": "qgen.export", "pipeline": "qgen.pipeline", "plan": "qgen.plan"}

if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
    sys.exit(importlib.import_module(COMMANDS[sys.argv[1]]).main(sys.argv[2:]))

from qgen.cli import main  # noqa: E402

main()
