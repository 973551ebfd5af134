"""GRPOModule with the reward callbacks: reference policy, trainable parameters, resume and DDP of the repetition bank."""

import json
import os

import lightning as L
import numpy as np
import pytest
import torch
from conftest import CONFIGS, ROOT, run_qgen, scalars
from helpers_ddp import _ScriptedBackend
from transformers import AutoModelForCausalLM

from callbacks import DifficultyReward, DiversityReward, NoveltyReward, RewardCallback, RigorReward
from qgen.cli import cli_main
from qgen.data import QuestionDataModule
from qgen.grpo import GRPOModule
from qgen.models import LoraSpec, embedded_path
from qgen.scoring import RewardOutput

SMALL = [
    "--model.init_args.group_size=4",
    "--model.init_args.max_new_tokens=16",
    "--data.batch_size=2",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def small_module(**kw):
    return GRPOModule(lora=LoraSpec(r=8, alpha=16, dropout=0.0), group_size=4, max_new_tokens=12, **kw)


def test_reference_with_adapter_disabled_equals_base_model():
    module = small_module()
    module.configure_model()
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter, so the two policies differ
    ids = torch.randint(5, 500, (2, 12))
    base = AutoModelForCausalLM.from_pretrained(embedded_path()).eval()
    module.model.eval()
    with torch.no_grad():
        expected = torch.log_softmax(base(input_ids=ids).logits, -1)
        with module.model.disable_adapter():
            reference = torch.log_softmax(module.model(input_ids=ids).logits, -1)
        policy = torch.log_softmax(module.model(input_ids=ids).logits, -1)
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)
    assert (policy - expected).abs().max() > 1e-2


def test_a_grpo_step_changes_only_lora_parameters_and_logs_rewards(tmp_path):
    L.seed_everything(3)
    module = small_module(beta=0.04)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    probe = LengthProbe(0.0)
    rewards = [DifficultyReward(), NoveltyReward(), RigorReward(), DiversityReward(), probe]
    trainer = L.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=rewards,
    )
    trainer.fit(module, QuestionDataModule(batch_size=2, max_length=256))
    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    for key in ("train/reward_mean", "train/kl", "train/clipfrac", "train/reward_novelty_mean", "train/frac_truncated"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    assert len(module.last["rollout"].texts) == 8  # 2 prompts x group of 4
    # scorers see each completion's token count (EOS included), as the rollout's mask counts it
    assert probe.seen[-1] == module.last["rollout"].completion_mask.sum(-1).tolist()


class LengthProbe(RewardCallback):
    name = "length_probe"

    def __init__(self, weight):
        super().__init__(weight)
        self.seen = []

    def score(self, batch):
        self.seen.append(list(batch.lengths))
        return RewardOutput(np.zeros(len(batch.texts), np.float32))


def test_grpo_without_rewards_fails_clearly(tmp_path):
    trainer = L.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    with pytest.raises(RuntimeError, match="no reward callbacks"):
        trainer.fit(small_module(), QuestionDataModule(batch_size=2, max_length=256))


def _grpo_args(save_dir, steps, *extra):
    return [
        "fit",
        "--config",
        os.path.join(CONFIGS, "grpo.yaml"),
        f"--trainer.max_steps={steps}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        *SMALL,
        *extra,
    ]


def _bank(ckpt):
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    return state["RepetitionReward"]["accepted"]


def test_resume_restores_the_repetition_bank(tmp_path):
    every = ["--trainer.callbacks.init_args.every_n_train_steps=2"]
    cli_main(_grpo_args(tmp_path / "straight", 4, *every))
    cli_main(_grpo_args(tmp_path / "split", 2, *every))
    cli_main(_grpo_args(tmp_path / "split", 4, *every, "--ckpt_path", "last"))
    straight = _bank(tmp_path / "straight/lightning_logs/version_0/checkpoints/last.ckpt")
    resumed = _bank(tmp_path / "split/lightning_logs/version_1/checkpoints/last.ckpt")
    assert len(straight) > 0 and resumed == straight
    first = scalars(tmp_path / "straight/lightning_logs/version_0", "train/reward_mean")
    second = scalars(tmp_path / "split/lightning_logs/version_1", "train/reward_mean")
    assert second[3] == pytest.approx(first[3], abs=1e-6)  # the same sample at step 4: RNG and data restored


@pytest.mark.slow
def test_ddp_ranks_hold_identical_repetition_banks(tmp_path):
    proc = run_qgen(
        _grpo_args(
            tmp_path,
            2,
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
            "--trainer.callbacks+=helpers_ddp.BankDump",
        ),
        env={"PYTHONPATH": os.path.join(ROOT, "tests"), "QGEN_TEST_DUMP": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    banks = [json.loads((tmp_path / f"bank_rank{r}.json").read_text()) for r in (0, 1)]
    assert banks[0] == banks[1]
    assert os.listdir(tmp_path / "lightning_logs") == ["version_0"]  # the rank-1 worker used rank 0's folder
    assert len(banks[0]["accepted"]) > 0


@pytest.mark.slow
def test_grpo_cli_logs_every_metric(tmp_path):
    held_out = ["--trainer.limit_val_batches=1", "--trainer.val_check_interval=3"]
    proc = run_qgen(_grpo_args(tmp_path, 3, "--trainer.callbacks.init_args.every_n_train_steps=3", *held_out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    for name in ("mean", "difficulty_mean", "novelty_mean", "rigor_mean", "diversity_mean"):
        assert len(scalars(run, f"val/reward_{name}")) == 1, name  # the held-out reward, once at step 3
    with pytest.raises(KeyError):  # not stationary: left out of the held-out reward
        scalars(run, "val/reward_repetition_mean")
    assert len(scalars(run, "train/reward_repetition_mean")) == 3
    for tag in (
        "train/reward_mean",
        "train/reward_std",
        "train/advantage_std",
        "train/frac_zero_std",
        "train/kl",
        "train/clipfrac",
        "train/completion_len_mean",
        "train/completion_len_max",
        "train/frac_truncated",
        "train/gen_tokens_per_s",
        "train/reward_difficulty_mean",
        "train/reward_novelty_std",
        "train/reward_rigor_mean",
        "train/reward_diversity_mean",
        "train/reward_rigor_answer_consistent",
    ):
        assert len(scalars(run, tag)) == 3, tag
    assert (run / "checkpoints" / "last.ckpt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    assert "hp_metric" not in events.Tags()["scalars"]  # no placeholder
    table = events.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| request |") and "<|im_start|>" not in table
    assert any(t in table for t in ("historical", "variant", "innovative"))  # the task and subject asked for


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_shared_prompt_forward_equals_full_forward(checkpointing):
    """Each prompt once, its KV cache shared by the group == every (prompt, completion) row in full:
    same log-probs and same LoRA gradients, with left-padded prompts of different lengths; under gradient
    checkpointing as well (the completion pass is checkpointed and reads the prompt's cache in the recompute).
    """
    from qgen.backends.hf import generate_group
    from qgen.logprobs import _checkpointed_layers, completion_logprobs
    from qgen.models import load_tokenizer

    module = small_module(gradient_checkpointing=checkpointing)
    module.configure_model()
    assert len(_checkpointed_layers(module.model.get_decoder())) == (4 if checkpointing else 0)
    model, tok = module.model, load_tokenizer(None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prompts = [
        tok("<|im_start|>user\nWrite a problem about primes.<|im_end|>\n<|im_start|>assistant\n")["input_ids"],
        tok("<|im_start|>user\n请命制一道数学填空题。<|im_end|>\n<|im_start|>assistant\n")["input_ids"],
    ]
    assert len(prompts[0]) != len(prompts[1])
    torch.manual_seed(0)
    rollout = generate_group(model, tok, prompts, group_size=4, max_new_tokens=12)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    model.train()
    for share in (False, True):
        logp = completion_logprobs(
            model.get_decoder(), model.get_output_embeddings().weight, rollout, share_prompt=share
        )
        grads = torch.autograd.grad((logp * rollout.completion_mask).sum(), params)
        results.append((logp.detach(), grads))
    if checkpointing:  # the flags are restored after the shared pass
        assert len(_checkpointed_layers(model.get_decoder())) == 4
        assert all("_can_checkpoint_with_cache" not in m.__dict__ for m in _checkpointed_layers(model.get_decoder()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # at temperature 0.7 the log-probs are of softmax(logits / 0.7), the distribution that sampled, on both paths
    with torch.no_grad():
        logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                       position_ids=(rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits  # fmt: skip
        p = rollout.prompt_length
        want = torch.log_softmax(logits[:, p - 1 : -1] / 0.7, -1).gather(-1, rollout.completion_ids[..., None])[..., 0]
        for share in (False, True):
            got = completion_logprobs(model.get_decoder(), model.get_output_embeddings().weight, rollout,
                                      share_prompt=share, temperature=0.7)  # fmt: skip
            mask = rollout.completion_mask.bool()
            torch.testing.assert_close(got[mask], want[mask], atol=1e-4, rtol=1e-4)


def _policy_with_an_adapter(generator=None):
    """The small GRPO module's model with a LoRA adapter that visibly changes the policy, and the tokenizer."""
    from qgen.models import load_tokenizer

    module = small_module()
    module.configure_model()
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=generator)
    return module.model, load_tokenizer(None)


def _chat_prompts(tok, *asks):
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    return [tok(chat.format(t))["input_ids"] for t in asks]


def test_generation_prefills_each_prompt_once_and_samples_the_same_tokens():
    """``generate_group`` prefills each prompt once and repeats its cache for the group: the same tokens as the
    repeated prefill for the same seed (sampled at T = 0.9 with top-p, and greedy), with left-padded prompts
    of different lengths; and the prompt pass really is one row per prompt.
    """
    from qgen.backends.hf import generate_group

    model, tok = _policy_with_an_adapter()
    prompts = _chat_prompts(tok, "Write a hard problem about primes and divisors.", "请命制一道数学填空题。")
    assert len(prompts[0]) != len(prompts[1])
    rows = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        for temperature, top_p in ((0.9, 0.95), (0.0, 1.0)):
            runs = []
            for share in (False, True):
                rows.clear()
                torch.manual_seed(3)
                runs.append(generate_group(model, tok, prompts, 4, 24, temperature, top_p, share_prompt=share))
                width = max(map(len, prompts))
                assert rows[0] == ((2, width - 1) if share else (8, width)), rows[:2]  # the prompt pass
            assert runs[0].completion_ids.tolist() == runs[1].completion_ids.tolist(), temperature
            assert torch.equal(runs[0].sequences, runs[1].sequences)
            if temperature:
                assert len(set(runs[1].texts[:4])) > 1  # sampled: the group's rows differ
    finally:
        hook.remove()


def test_seeded_sampling_draws_each_completion_from_its_own_stream():
    """The hf engine with per-request seeds: a completion is the same whether its prompt is sampled alone or in a
    batch with others (what lets one process sample what two ranks sample); the distribution is
    ``transformers``' own (temperature then top-p warpers), and inversion draws from it (frequencies over 4,000
    streams within 0.03 of the probabilities).
    """
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from qgen.backends.hf import SeededSampling, generate_group

    model, tok = _policy_with_an_adapter(torch.Generator().manual_seed(4))
    prompts = _chat_prompts(tok, "Write a hard problem about primes.", "请命制一道数学填空题。")
    seeds = list(range(100, 108))
    both = generate_group(model, tok, prompts, 4, 20, 0.7, 0.9, min_new_tokens=8, seeds=seeds)
    torch.manual_seed(123)  # the global RNG plays no part
    alone = generate_group(model, tok, prompts[1:], 4, 20, 0.7, 0.9, min_new_tokens=8, seeds=seeds[4:])
    assert both.texts[4:] == alone.texts and len(set(both.texts)) == 8
    assert int(both.completion_mask.sum(1).min()) >= 8
    other = generate_group(model, tok, prompts[1:], 4, 20, 0.7, 0.9, min_new_tokens=8, seeds=[s + 50 for s in seeds[4:]])
    assert other.texts != alone.texts

    scores = torch.randn(3, 12, generator=torch.Generator().manual_seed(0)) * 2
    want = TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.7)(None, scores.clone())).softmax(-1)
    sampler = SeededSampling(list(range(4000)), 0.7, 0.9, prompt_width=0, max_new_tokens=1)
    torch.testing.assert_close(sampler.distribution(scores), want)
    rows = scores[1:2].expand(4000, -1)
    picked = sampler(torch.zeros(4000, 0, dtype=torch.long), rows).argmax(-1)
    freq = torch.bincount(picked, minlength=12).float() / 4000
    assert (freq - want[1]).abs().max() < 0.03 and freq[want[1] == 0].sum() == 0


def _sft_checkpoint(root, lora):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from qgen.sft import SFTModule

    L.seed_everything(0)
    sft = SFTModule(lora=lora, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    L.Trainer(default_root_dir=str(root), max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
              limit_val_batches=0, callbacks=[ModelCheckpoint(dirpath=str(root), save_last=True, save_top_k=0)],
              ).fit(sft, QuestionDataModule(batch_size=2, max_length=192))  # fmt: skip
    return str(root / "last.ckpt"), sft


@pytest.mark.parametrize("sft_lora", [LoraSpec(r=8, alpha=16, dropout=0.0), None], ids=["lora-sft", "full-sft"])
def test_init_from_an_sft_checkpoint_makes_it_the_reference_policy(tmp_path, sft_lora):
    """GRPO starts from the SFT policy (merged into the base) with a fresh adapter, so reference == SFT model;
    load_from_checkpoint rebuilds a GRPO checkpoint's model through the same chain.
    """
    from qgen.models import load_from_checkpoint

    ckpt, sft = _sft_checkpoint(tmp_path, sft_lora)
    grpo = GRPOModule(init_from=ckpt, lora=LoraSpec(r=8, alpha=16, dropout=0.0))
    grpo.configure_model()
    assert all(torch.count_nonzero(p) == 0 for n, p in grpo.model.named_parameters() if "lora_B" in n)
    ids = torch.randint(5, 500, (2, 10))
    sft.model.eval(), grpo.model.eval()
    with torch.no_grad():
        expected = sft.model(input_ids=ids).logits
        with grpo.model.disable_adapter():
            reference = grpo.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(embedded_path()).eval()(input_ids=ids).logits
    torch.testing.assert_close(reference, expected, atol=1e-4, rtol=1e-4)
    assert (expected - base).abs().max() > 1e-2  # SFT moved the model: the test can tell them apart

    with torch.no_grad():  # a "trained" GRPO adapter, saved as a checkpoint, and rebuilt from it
        for n, p in grpo.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        policy = grpo.model(input_ids=ids).logits
    state = {f"model.{n}": p.detach().clone() for n, p in grpo.model.named_parameters() if p.requires_grad}
    torch.save({"state_dict": state, "hyper_parameters": {**grpo.hparams, "_class_path": "qgen.GRPOModule"}},
               tmp_path / "grpo.ckpt")  # fmt: skip
    with torch.no_grad():
        rebuilt = load_from_checkpoint(str(tmp_path / "grpo.ckpt"))(input_ids=ids).logits
    torch.testing.assert_close(rebuilt, policy, atol=1e-4, rtol=1e-4)


def test_init_from_errors(tmp_path):
    ckpt, _ = _sft_checkpoint(tmp_path, LoraSpec(r=8, alpha=16, dropout=0.0))
    with pytest.raises(FileNotFoundError, match="init_from"):
        GRPOModule(init_from=str(tmp_path / "missing.ckpt")).configure_model()
    with pytest.raises(ValueError, match="was trained on the embedded default"):
        GRPOModule(init_from=ckpt, model_name_or_path="embedded:mini").configure_model()
    with pytest.raises(ValueError, match="other shapes"):  # quantized: the SFT adapter is trained further, same rank needed
        GRPOModule(init_from=ckpt, lora=LoraSpec(r=4), quantization="nf4").configure_model()


def test_a_moved_grpo_run_resumes_from_its_new_folder(tmp_path, monkeypatch):
    """GRPO from an SFT checkpoint given by a relative path; the whole folder moves; --ckpt_path resumes
    from the new place, finding the SFT model beside the checkpoint (the recorded absolute path is gone).
    """
    import shutil

    runs = tmp_path / "runs"
    runs.mkdir()
    ckpt, _ = _sft_checkpoint(runs / "sft", LoraSpec(r=8, alpha=16, dropout=0.0))
    monkeypatch.chdir(runs)
    relative = os.path.relpath(ckpt, runs)
    cli_main(_grpo_args(runs, 1, f"--model.init_args.init_from={relative}"))
    grpo_ckpt = runs / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(grpo_ckpt, weights_only=True)["hyper_parameters"]["init_from"] == os.path.abspath(relative)
    moved = tmp_path / "moved"
    shutil.move(str(runs), str(moved))
    monkeypatch.chdir(tmp_path)
    cli_main(_grpo_args(moved, 2, "--ckpt_path", str(moved / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")))
    assert (moved / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt").is_file()


class SlowLength(RewardCallback):
    """Rewards completion length, after ``delay`` seconds (a judge's latency)."""

    name = "slow_length"

    def __init__(self, delay):
        super().__init__(1.0)
        self.delay = delay

    def score(self, batch):
        import time

        time.sleep(self.delay)
        return RewardOutput(np.asarray(batch.lengths, np.float32) / 16)


def _ref_calls_per_micro_batch(tmp_path, delay):
    L.seed_everything(5)
    module = small_module(beta=0.04)
    calls, per_step = [], []
    ref, step_fn = module._ref_logprobs, module.training_step

    def counting_ref(*a, **kw):
        calls.append(1)
        return ref(*a, **kw)

    def counting_step(*a, **kw):
        before = len(calls)
        out = step_fn(*a, **kw)
        per_step.append(len(calls) - before)
        return out

    module._ref_logprobs, module.training_step = counting_ref, counting_step
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_steps=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        accumulate_grad_batches=2, callbacks=[SlowLength(delay)])  # fmt: skip
    trainer.fit(module, QuestionDataModule(batch_size=2, max_length=256))
    lora = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}
    return per_step, lora


def test_reference_passes_of_later_micro_batches_fill_the_wait_for_scores(tmp_path):
    # a slow scorer: the first micro-batch computes the second's reference log-probs while it waits
    slow_calls, slow = _ref_calls_per_micro_batch(tmp_path / "slow", delay=1.0)
    assert slow_calls == [2, 0, 2, 0]
    # a scorer that is done at once: each micro-batch computes its own
    fast_calls, fast = _ref_calls_per_micro_batch(tmp_path / "fast", delay=0.0)
    assert fast_calls == [1, 1, 1, 1]
    # the same training either way: the reference does not change within a step
    for name in fast:
        torch.testing.assert_close(slow[name], fast[name], atol=1e-6, rtol=1e-5)


class _OffPolicyEngine(_ScriptedBackend):
    """Scripted completions whose engine log-probs are deliberately wrong (-6.5 and -9 in turn), so the
    importance weights ``min(exp(trainer logp - engine logp), 2)`` range from a fraction to the cap.
    """

    name = "off-policy"

    def generate(self, model, tokenizer, prompts, group_size, max_new_tokens, temperature, top_p, min_new_tokens=0,
                 seeds=None, reference=False):  # fmt: skip
        from qgen.backends.rollout import Rollout

        gen = torch.Generator().manual_seed(1)
        rows = [torch.randint(10, 400, (int(torch.randint(3, max_new_tokens, (1,), generator=gen)),), generator=gen)
                .tolist() + [tokenizer.eos_token_id] for _ in range(len(prompts) * group_size)]  # fmt: skip
        engine = [[(-6.5, -9.0)[t % 2] for t in range(len(r))] for r in rows]
        return Rollout.from_completions(prompts, rows, group_size, tokenizer, engine)


class _RowReward(RewardCallback):
    name = "row"

    def score(self, batch):
        return RewardOutput(np.arange(len(batch.texts), dtype=np.float32) % 3)


class _StepProbe(L.Callback):
    """Gives the adapter a trained-looking B, then records the weights before and the gradients of step 0."""

    def on_fit_start(self, trainer, pl_module):
        pl_module.use_backend(_OffPolicyEngine())
        with torch.no_grad():
            for name, p in pl_module.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.rollout, self.rewards = pl_module.last["rollout"], pl_module.last["rewards"]


def test_importance_weights_scale_the_policy_gradient_end_to_end(tmp_path):
    """A GRPO step whose engine is off-policy: the update's gradient is that of the hand-weighted loss
    ``-mean_i (1 / T_i) sum_t min(exp(logp_it - engine_it), 2) A_i logp_it`` (beta 0), and not the unweighted one.
    """
    from qgen.logprobs import completion_logprobs
    from qgen.losses import group_advantages

    L.seed_everything(0)
    module = small_module(beta=0.0)
    probe = _StepProbe()
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_steps=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        callbacks=[_RowReward(weight=1.0), probe])  # fmt: skip
    trainer.fit(module, QuestionDataModule(batch_size=2, max_length=256))
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n in probe.before:
                p.copy_(probe.before[n])
    rollout, mask = probe.rollout, probe.rollout.completion_mask.float()
    advantages = group_advantages(probe.rewards.view(-1, 4), "group_std").view(-1)
    assert advantages.abs().max() > 0.5

    def hand_grads(weighted: bool) -> dict:
        module.zero_grad()
        logp = completion_logprobs(module.model.get_decoder(), module.model.get_output_embeddings().weight, rollout)
        weights = torch.clamp(torch.exp(logp.detach() - rollout.sampling_logprobs), max=2.0) if weighted else 1.0
        loss = -(((weights * advantages[:, None] * logp * mask).sum(-1)) / mask.sum(-1)).mean()
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}

    weighted, plain = hand_grads(True), hand_grads(False)
    w = torch.clamp(torch.exp(completion_logprobs(module.model.get_decoder(),
                                                  module.model.get_output_embeddings().weight, rollout).detach()
                              - rollout.sampling_logprobs), max=2.0)[mask.bool()]  # fmt: skip
    assert w.min() < 0.5 and (w == 2.0).any()  # the weights really vary, and some are capped
    assert set(probe.grads) == set(weighted) and len(weighted) > 10
    for name, grad in probe.grads.items():
        torch.testing.assert_close(grad, weighted[name], rtol=1e-4, atol=1e-7)
    assert max(float((plain[n] - weighted[n]).norm() / weighted[n].norm().clamp(min=1e-12)) for n in plain) > 0.1


def _audited_hf_run(tmp_path, steps):
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0)
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = small_module()
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_steps=steps, accelerator="cpu", log_every_n_steps=1,
                        logger=TensorBoardLogger(str(tmp_path), name="", version=0), enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False,
                        callbacks=[DiversityReward(),
                                   ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)])  # fmt: skip
    trainer.fit(module, QuestionDataModule(batch_size=2, max_length=192))
    return tmp_path / "version_0"


def test_the_hf_engine_is_audited_against_its_own_kv_cache(tmp_path, monkeypatch):
    """hf: the log-probs recorded while sampling (through the KV cache) against the trainer's full forward. A
    healthy run's gap is float32 noise; a corrupted prompt cache (keys scaled by 1.5 after the prefill) stops the
    run at the second audited step, with the one line and a checkpoint.
    """
    import qgen.backends.hf as hf
    from qgen.audit import EngineMismatchError

    gaps = scalars(_audited_hf_run(tmp_path / "healthy", 3), "train/engine_logprob_absdiff_mean")
    assert sorted(gaps) == [0, 1, 2] and max(gaps.values()) < 1e-5

    real = hf._shared_prompt_cache

    def corrupted(model, ids, mask, group_size):
        cache = real(model, ids, mask, group_size)
        for layer in cache.layers:
            layer.keys.mul_(1.5)
        return cache

    monkeypatch.setattr(hf, "_shared_prompt_cache", corrupted)
    with pytest.raises(EngineMismatchError, match=r"on the 2 steps right after weight pushes at steps 0, 1 .*"
                                                  r"engine-audit-step1\.ckpt$") as caught:  # fmt: skip
        _audited_hf_run(tmp_path / "faulty", 4)
    assert (tmp_path / "faulty/ckpt/engine-audit-step1.ckpt").is_file()
    assert "likely cause: the KV cache the sampler read disagrees with the model" in str(caught.value)
