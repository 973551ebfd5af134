"""Callbacks for the DDP tests: every rank writes what it holds to $QGEN_TEST_DUMP (one file per rank)."""

import json
import os

import bitsandbytes  # noqa: F401 - the libraries a (Q)LoRA run imports count in HostMemoryDump's baseline
import peft  # noqa: F401
from lightning.pytorch import Callback

from callbacks import RepetitionReward, RewardCallback
from callbacks.memory import peak_rss_bytes

AFTER_IMPORT = peak_rss_bytes()  # this module is imported while the command line is parsed, before any model


class BankDump(Callback):
    def on_train_end(self, trainer, pl_module):
        bank = next(cb for cb in trainer.callbacks if isinstance(cb, RepetitionReward))
        path = os.path.join(os.environ["QGEN_TEST_DUMP"], f"bank_rank{trainer.global_rank}.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"accepted": bank.accepted, "size": len(bank.index)}, fh, ensure_ascii=False)


class RolloutDump(Callback):
    """Every rank writes, per step, each prompt's (dataset index) sampled texts to rollouts_rank{R}.json."""

    def __init__(self):
        self.steps: dict[int, dict[int, list[str]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rollout, g = pl_module.last["rollout"], pl_module.hparams.group_size
        texts = self.steps.setdefault(trainer.global_step - 1, {})
        for j, index in enumerate(int(i) for i in batch["index"]):
            texts[index] = rollout.texts[j * g : (j + 1) * g]

    def on_train_end(self, trainer, pl_module):
        path = os.path.join(os.environ["QGEN_TEST_DUMP"], f"rollouts_rank{trainer.global_rank}.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.steps, fh, ensure_ascii=False)


class ShardDump(Callback):
    """Every rank writes shard_rank{R}.json: how much of the model it holds, what its optimizer holds, whether
    its frozen weights changed, the dataset indices of its micro-batches per step, and (rank 0) the final logits of
    a fixed input (logits.pt).
    """

    IDS = list(range(5, 37))

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        local = lambda p: p.to_local() if isinstance(p, DTensor) else p  # noqa: E731
        self.frozen = {n: local(p).detach().clone() for n, p in pl_module.named_parameters() if not p.requires_grad}
        params = list(pl_module.named_parameters())
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.info = {
            "full_numel": sum(p.numel() for _, p in params),
            "local_numel": sum(local(p).numel() for _, p in params),
            "sharded": sum(isinstance(p, DTensor) or "_fsdp_wrapped_module." in n for n, p in params),  # FSDP2 or 1
            "optimizer_tensors": len(optimized),
            "trainable_tensors": sum(p.requires_grad for _, p in params),
            "optimizer_all_trainable": all(p.requires_grad for _, p in params if id(p) in optimized),
            "built_empty": pl_module.builds_empty(),
            "batches": {},
            "target_tokens": {},
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # every micro-batch of the step (with gradient accumulation, several)
        self.info["batches"].setdefault(str(trainer.global_step), []).extend(int(i) for i in batch["index"])
        if "labels" in batch:  # the tokens a per-token mean of this rank's batch is over
            self.info["target_tokens"][str(trainer.global_step)] = int((batch["labels"][:, 1:] != -100).sum())

    def on_train_end(self, trainer, pl_module):
        import torch
        from torch.distributed.tensor import DTensor

        local = lambda p: p.to_local() if isinstance(p, DTensor) else p  # noqa: E731
        bits = lambda t: t.detach().contiguous().flatten().view(torch.uint8)  # noqa: E731 - 4-bit storage holds NaN bit patterns
        self.info["frozen_unchanged"] = all(
            torch.equal(bits(local(p)), bits(self.frozen[n])) for n, p in pl_module.named_parameters() if n in self.frozen
        )
        model = pl_module.model
        was_training = model.training
        model.eval()
        with torch.no_grad():  # a forward over sharded layers: every rank takes part
            logits = model(input_ids=torch.tensor([self.IDS])).logits.float()
        model.train(was_training)
        folder = os.environ["QGEN_TEST_DUMP"]
        if trainer.global_rank == 0:
            torch.save(logits, os.path.join(folder, "logits.pt"))
        with open(os.path.join(folder, f"shard_rank{trainer.global_rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(self.info, fh)


class _ScriptedBackend:
    """Completions that are a pure function of each request's seed (run seed, step, the prompt's dataset index,
    sample: :func:`qgen.backends.request_seed`), so one process and any number of ranks sample the same.
    """

    name = "scripted"
    wants_whole_waves = False

    def prepare(self, model, tokenizer, step):
        pass

    def stats(self):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def close(self):
        pass

    def generate(self, model, tokenizer, prompts, group_size, max_new_tokens, temperature, top_p, min_new_tokens=0,
                 seeds=None, reference=False):  # fmt: skip
        import torch

        from qgen.backends.rollout import Rollout

        assert seeds is not None and len(seeds) == len(prompts) * group_size
        rows = []
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed % (2**63))
            n = int(torch.randint(3, max_new_tokens + 1, (1,), generator=gen))
            rows.append(torch.randint(10, 400, (n,), generator=gen).tolist() + ([tokenizer.eos_token_id] * (
                n < max_new_tokens)))  # fmt: skip
        return Rollout.from_completions(prompts, rows, group_size, tokenizer)


class LengthReward(RewardCallback):
    """A reward that differs from row to row (each completion's length in characters, scaled), so that the std
    of one rank's rows is not the std of the step's."""

    name = "length"

    def __init__(self, weight: float = 0.1):
        super().__init__(weight)

    def score(self, batch):
        import numpy as np

        from qgen.scoring import RewardOutput

        return RewardOutput(np.array([min(len(t), 200) / 200 for t in batch.texts], dtype=np.float32))


class ScriptedRollouts(Callback):
    """Swap the module's generation backend for :class:`_ScriptedBackend` before the run's first step."""

    def on_fit_start(self, trainer, pl_module):
        pl_module.use_backend(_ScriptedBackend())


class StopRankOne(Callback):
    """Rank 1 stops itself (SIGSTOP) once step 2 is done: a rank that no longer answers, as a hung or swapped-out
    process would."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            import signal

            with open(os.path.join(os.environ["QGEN_TEST_DUMP"], "stopped_pid"), "w") as fh:
                fh.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)


class PoisonAtStep2(Callback):
    """Sets one trainable weight to NaN before step 2's first micro-batch: its loss is NaN."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2 and batch_idx % trainer.accumulate_grad_batches == 0:
            import torch

            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).view(-1)[0] = float("nan")


FIXED_QUESTION = "Question: Compute 3*4.\nAnswer: 12\nSolution: 3*4 = 12, so the answer is 12."


class _FixedQuestionBackend(_ScriptedBackend):
    def generate(self, model, tokenizer, prompts, group_size, max_new_tokens, *args, **kwargs):
        from qgen.backends.rollout import Rollout

        ids = tokenizer(FIXED_QUESTION, add_special_tokens=False)["input_ids"][: max_new_tokens - 1]
        rows = [ids + [tokenizer.eos_token_id]] * (len(prompts) * group_size)
        return Rollout.from_completions(prompts, rows, group_size, tokenizer)


class FixedQuestionRollouts(Callback):
    """Every completion is one fixed, well-formed question (its own stated answer and solution)."""

    def on_fit_start(self, trainer, pl_module):
        pl_module.use_backend(_FixedQuestionBackend())


class HostMemoryDump(Callback):
    """Every rank writes host_rank{R}.json: its peak resident memory after import (when the CLI parsed this
    callback, the libraries a (Q)LoRA run needs imported) and at the end of training, in bytes.
    """

    def on_train_end(self, trainer, pl_module):
        path = os.path.join(os.environ["QGEN_TEST_DUMP"], f"host_rank{trainer.global_rank}.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"after_import": AFTER_IMPORT, "peak": peak_rss_bytes()}, fh)
