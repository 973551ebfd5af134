"""SampleTextCallback: a few prompt / question / reward rows in TensorBoard's text tab every N steps."""

from __future__ import annotations

from lightning.pytorch import Callback


class SampleTextCallback(Callback):
    """Write ``rows`` generated samples to the logger's text tab every ``every_n_steps`` training steps.

    Args:
        every_n_steps: steps between two sample tables.
        rows: samples per table (the first completions of the batch).
    """

    def __init__(self, every_n_steps: int = 20, rows: int = 4):
        self.every_n_steps, self.rows = every_n_steps, rows
        self._logged = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = getattr(pl_module, "last", {})
        step = trainer.global_step
        # after the first optimizer step, then every every_n_steps (once per step under gradient accumulation)
        if "rollout" not in last or (step - 1) % self.every_n_steps != 0 or step == self._logged or \
                not trainer.is_global_zero:  # fmt: skip
            return
        self._logged = step
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        tok, rollout, g = pl_module.tokenizer, last["rollout"], last["rollout"].group_size
        lines = ["| request | generated | reward | " + " | ".join(last["components"]) + " |",
                 "|---|---|---|" + "---|" * len(last["components"])]  # fmt: skip
        examples = last.get("examples") or []
        for i in range(min(self.rows, len(rollout.texts))):
            if i // g < len(examples):  # the user's request, not the chat template around it
                request = describe_request(examples[i // g])
            else:
                request = tok.decode(last["prompts"][i // g], skip_special_tokens=True)[-300:]
            parts = [_cell(request), _cell(rollout.texts[i][:600]), f"{float(last['rewards'][i]):.3f}"]
            parts += [f"{float(c.values[i]):.3f}" for c in last["components"].values()]
            lines.append("| " + " | ".join(parts) + " |")
        experiment.add_text("samples", "\n".join(lines), global_step=step)


def describe_request(example) -> str:
    """What was asked, in a line: task, subject, question type, level, language, knowledge points."""
    r = example.record
    fields = [example.task, r.subject, r.qtype, r.level, r.language]
    if r.knowledge:
        fields.append("knowledge: " + ", ".join(r.knowledge[:3]))
    return " / ".join(f for f in fields if f)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")
