"""The ``qgen`` command line: eight commands under one name (``python -m qgen`` or the ``qgen`` script).

The four Lightning commands run a stage from a config (:mod:`qgen.cli`); the four plain ones are small
argparse programs that load no Lightning machinery. ``python -m qgen --help`` lists all eight, and an
unknown command answers with the same list.
"""

from __future__ import annotations

import importlib
import os
import sys

LIGHTNING = {
    "fit": "train a stage (SFT, GRPO or distillation) from a config; --ckpt_path last resumes",
    "validate": "validation loss and rewards of a checkpoint on the held-out split",
    "test": "BLEU / ROUGE / novelty / diversity / answer consistency against the held-out split",
    "predict": "write generated questions with their scores for a prompts file",
}
PLAIN = {
    "pipeline": ("qgen.pipeline", "SFT -> GRPO -> distillation on the embedded default, then sample questions"),
    "score": ("qgen.score", "score a question file without a model, and check it for benchmark contamination"),
    "export": ("qgen.export", "turn a checkpoint into a PEFT adapter or merged model folder"),
    "plan": ("qgen.plan", "per-GPU memory of a config on N GPUs, per sharding strategy, without loading weights"),
}
COMMANDS = {**LIGHTNING, **{name: text for name, (_, text) in PLAIN.items()}}


def program_name(argv0: str | None = None) -> str:
    """``python -m qgen`` when run as a module, else the script's own name (``qgen``)."""
    name = os.path.basename(argv0 if argv0 is not None else sys.argv[0])
    return "python -m qgen" if name in ("__main__.py", "-m", "-c", "") else name


def usage(prog: str) -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {prog} COMMAND [options]", "", "Train and evaluate LLMs that write exam questions.", "",
             "commands:"]  # fmt: skip
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", f"`{prog} COMMAND --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run one command; returns its exit status (the Lightning commands exit themselves on errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or program_name()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command = argv[0]
    if command in PLAIN:
        return importlib.import_module(PLAIN[command][0]).main(argv[1:]) or 0
    if command in LIGHTNING or command.startswith("-"):  # Lightning's own options (--config, --print_config) too
        from qgen.cli import main as lightning_main

        lightning_main(None if argv == sys.argv[1:] else argv, prog)  # None: Lightning reads sys.argv itself
        return 0
    print(f"{prog}: error: unknown command {command!r}\n\n{usage(prog)}", file=sys.stderr)
    return 2
