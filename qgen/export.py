"""``python -m qgen export``: a trained checkpoint as a folder that plain ``transformers`` loads.

    python -m qgen export --ckpt_path lightning_logs/version_1/checkpoints/last.ckpt --output out/adapter
    python -m qgen export --ckpt_path last --output out/merged --merge

Without ``--merge`` a LoRA checkpoint becomes a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, naming its base model by absolute path; a GRPO run started from an SFT
model, whose adapter sits on that model, gets it written to ``DIR/base_model``); with ``--merge`` (and
always for a full fine-tune) a complete model folder with the adapter folded in. The tokenizer and its chat template are saved beside
the weights, so ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``
are all a user needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def export(ckpt_path: str, output: str, merge: bool = False) -> dict:
    """Write the model of ``ckpt_path`` to ``output``; returns a summary of what was written."""
    from qgen.checkpointing import locate_source
    from qgen.models import checkpoint_backbone, load_from_checkpoint, load_policy, load_tokenizer, resolve

    info = checkpoint_backbone(ckpt_path)
    merged = merge or not info["lora"]
    if os.path.isdir(output) and os.listdir(output):
        raise FileExistsError(f"--output {output} exists and is not empty; choose a new folder")
    model = load_from_checkpoint(ckpt_path, merge=merged)
    tokenizer = load_tokenizer(info["model_name_or_path"])
    os.makedirs(output, exist_ok=True)
    if not merged:
        # name the folder the adapter sits on, so from_pretrained finds it: the resolved backbone (for the
        # embedded default, its cache folder), or, for GRPO started from an SFT model merged into its base,
        # that merged model, written beside the adapter
        base = resolve(info["model_name_or_path"])
        if info["base_from"]:
            base = os.path.abspath(os.path.join(output, "base_model"))
            source = locate_source(ckpt_path, info["base_from"], info["base_from_info"])
            load_policy(source, info["model_name_or_path"], info["dtype"]).save_pretrained(base)
            tokenizer.save_pretrained(base)
        model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    summary = {"checkpoint": os.path.abspath(ckpt_path), "output": os.path.abspath(output),
               "kind": "merged" if merged else "adapter", "base": info["model_name_or_path"],
               "files": sorted(os.listdir(output))}  # fmt: skip
    with open(os.path.join(output, "qgen_export.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qgen export", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="a qgen .ckpt, or 'last' (newest under lightning_logs/)")
    parser.add_argument("--output", required=True, help="folder to write (must be new or empty)")
    parser.add_argument("--merge", action="store_true", help="fold the LoRA adapter into the base weights")
    args = parser.parse_args(argv)
    ckpt = args.ckpt_path
    try:
        if ckpt == "last":
            from qgen.checkpointing import find_last_checkpoint

            ckpt = find_last_checkpoint("lightning_logs")
        summary = export(ckpt, args.output, args.merge)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"qgen export: {err}", file=sys.stderr)
        return 2
    print(f"exported {summary['kind']} model of {ckpt} to {args.output}: {', '.join(summary['files'])}")
    return 0
