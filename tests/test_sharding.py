"""Past one process on this CPU machine: FSDP2 (qgen.strategies.FSDP2Strategy), FSDP1 (qgen.strategies.
FSDP1Strategy, torch's CPU path) and DDP with 2 gloo processes, and a two-node torchrun launch simulated with
one process per "node".

Every run is the embedded default with a LoRA adapter in float32, 2-4 steps, so that 1 process, DDP x 2,
FSDP2 x 2 and FSDP1 x 2 see the same 4 examples per step and must produce the same losses (the checkpoint
tests resume 2-rank runs towards one 4-step one-process run); the FSDP1 QLoRA overlay also runs as shipped
(4-bit weights stored in bf16, bitsandbytes' CPU kernels).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import CONFIGS, ROOT, run_qgen, scalar_tags, scalars
from helpers_ddp import ShardDump

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
TWO_CPUS = ["--trainer.devices=2", "--trainer.accelerator=cpu"]
FSDP2 = ["--config", os.path.join(CONFIGS, "strategy", "fsdp2-lora.yaml"), "--model.init_args.dtype=float32"]
FSDP1_QLORA = ["--config", os.path.join(CONFIGS, "strategy", "fsdp-qlora.yaml")]
FSDP1 = [*FSDP1_QLORA, "--model.init_args.quantization=null", "--model.init_args.dtype=float32"]
DDP = ["--config", os.path.join(CONFIGS, "strategy", "ddp.yaml")]
LORA = ["--model.init_args.lora.r=8", "--model.init_args.lora.dropout=0.0"]


def _env(dump):
    return {"PYTHONPATH": os.path.join(ROOT, "tests"), "QGEN_TEST_DUMP": str(dump)}


def _stage_args(config, save_dir, steps, *extra):
    return ["fit", "--config", os.path.join(CONFIGS, config), f"--trainer.max_steps={steps}",
            f"--trainer.logger.init_args.save_dir={save_dir}", "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=0", "--trainer.val_check_interval=1000", *QUIET, *LORA,
            "--trainer.callbacks+=helpers_ddp.ShardDump", *extra]  # fmt: skip


def _fit(tmp_path, name, config, steps, per_rank_batch, *extra):
    folder = tmp_path / name
    folder.mkdir()
    proc = run_qgen(_stage_args(config, folder, steps, f"--data.batch_size={per_rank_batch}", *extra),
                    env=_env(folder))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = folder / "lightning_logs" / "version_0"
    dumps = sorted(folder.glob("shard_rank*.json"))
    return run, [json.loads(p.read_text()) for p in dumps], folder


def _scalar_list(run, tag):
    values = scalars(run, tag)
    return [values[k] for k in sorted(values)]


def _losses(run):
    return _scalar_list(run, "train/loss")


@pytest.mark.slow
@pytest.mark.parametrize("config, extra, fsdp_extra", [
    # FSDP with activation checkpointing inside its units (as the Qwen3-14B configs run); plain SGD with
    # gradients clipped on every step, so that the update is the clip's (AdamW would cancel a clip's scale):
    # the norm must be the global one, over shards and ranks
    ("sft.yaml", ["--trainer.gradient_clip_val=0.05", "--model.init_args.optimizer=torch.optim.SGD",
                  "--model.init_args.optimizer.init_args.lr=20.0"], ["--model.init_args.gradient_checkpointing=true"]),
    # off-policy distillation, one process vs FSDP1 (DDP vs FSDP2 with a sharded teacher: the on-policy test)
    ("distill.yaml", ["--model.init_args.lmbda=0.0", "--model.init_args.teacher=embedded:default",
                      "--data.group_by_length=false"], []),
], ids=["sft", "distill"])  # fmt: skip
def test_one_process_ddp_fsdp2_and_fsdp1_train_the_same(tmp_path, config, extra, fsdp_extra):
    one, (single,), _ = _fit(tmp_path, "one", config, 3, 4, *extra)
    fsdp1, ranks1, _ = _fit(tmp_path, "fsdp1", config, 3, 2, *TWO_CPUS, *FSDP1, *extra, *fsdp_extra)
    reference = _losses(one)
    assert len(reference) == 3
    assert _losses(fsdp1) == pytest.approx(reference, abs=1e-5, rel=1e-5)
    if config == "distill.yaml":  # the step's per-token divergence over both ranks' tokens, not a mean of the
        # ranks' means: the ranks' examples have different lengths
        steps = sorted(ranks1[0]["target_tokens"])
        assert any(ranks1[0]["target_tokens"][s] != ranks1[1]["target_tokens"][s] for s in steps)
        assert _scalar_list(fsdp1, "train/divergence") == pytest.approx(_scalar_list(one, "train/divergence"), rel=1e-5)

    # FSDP1: each rank holds about half of the weights (its shards of every unit, plus the replicated output
    # layer), only the adapter reaches the optimizer, the frozen base is bit-identical after 3 steps
    for info in ranks1:
        assert 0.45 * single["full_numel"] < info["local_numel"] < 0.62 * single["full_numel"]
        assert info["optimizer_tensors"] == info["trainable_tensors"] == single["trainable_tensors"] > 0
        assert info["optimizer_all_trainable"] and info["frozen_unchanged"]

    if config != "sft.yaml":  # distillation with a sharded teacher under FSDP2 and DDP: the on-policy test
        return
    ddp, _, _ = _fit(tmp_path, "ddp", config, 3, 2, *TWO_CPUS, *DDP, *extra)
    assert _losses(ddp) == pytest.approx(reference, abs=1e-5, rel=1e-5)  # logged over ranks, not rank 0's
    assert _scalar_list(ddp, "train/token_nll") == pytest.approx(_scalar_list(one, "train/token_nll"), rel=1e-5)
    fsdp, ranks, _ = _fit(tmp_path, "fsdp2", config, 3, 2, *TWO_CPUS, *FSDP2, *extra, *fsdp_extra)
    assert _losses(fsdp) == pytest.approx(reference, abs=1e-5, rel=1e-5)

    # FSDP2 shards the policy (and the teacher): each rank holds about half of the sharded weights; rank 1
    # built its models on the meta device and received rank 0's weights (one host copy, not one per rank)
    assert single["local_numel"] == single["full_numel"] and single["sharded"] == 0
    assert [info["built_empty"] for info in ranks] == [False, True] and not single["built_empty"]
    for info in ranks:
        assert info["sharded"] > 0
        assert 0.45 * info["full_numel"] < info["local_numel"] < 0.62 * info["full_numel"]  # + replicated lm_head
        # only the adapter reaches the optimizer, and the frozen base is bit-identical after 3 steps
        assert info["optimizer_tensors"] == info["trainable_tensors"] > 0 and info["optimizer_all_trainable"]
        assert info["frozen_unchanged"]
    # the two ranks saw disjoint halves of every step's examples, together the single process's examples
    seen = [set(ranks[0]["batches"][s]) | set(ranks[1]["batches"][s]) for s in ("0", "1", "2")]
    assert all(not set(ranks[0]["batches"][s]) & set(ranks[1]["batches"][s]) for s in ("0", "1", "2"))
    assert seen == [set(single["batches"][s]) for s in ("0", "1", "2")]


@pytest.mark.slow
def test_grpo_losses_equal_across_one_process_and_fsdp2_with_scripted_rollouts(tmp_path):
    """GRPO's loss maths over ranks (group advantages, the step's token normaliser, KL to the reference) with
    rollouts that do not depend on the rank layout: completions scripted from the per-request seeds.
    """
    grpo = ["--model.init_args.group_size=4", "--model.init_args.max_new_tokens=12",
            "--trainer.callbacks+=helpers_ddp.ScriptedRollouts", "--trainer.callbacks+=helpers_ddp.LengthReward"]  # fmt: skip
    one, _, _ = _fit(tmp_path, "one", "grpo.yaml", 3, 2, *grpo)
    fsdp, _, _ = _fit(tmp_path, "fsdp2", "grpo.yaml", 3, 1, *TWO_CPUS, *FSDP2, *grpo)
    reference = _losses(one)
    assert len(reference) == 3 and len(set(reference)) == 3
    assert _losses(fsdp) == pytest.approx(reference, abs=1e-5, rel=1e-5)  # DDP: the sampling test's losses
    # each component's std is over both ranks' rows (one prompt's group each), as one process's over the step
    # (rank 0's alone would differ: its group has other rewards)
    tags = [t for t in scalar_tags(one) if t.startswith("train/reward_") and t.endswith("_std")]
    assert "train/reward_length_std" in tags and min(_scalar_list(one, "train/reward_length_std")) > 0
    for tag in tags:
        assert _scalar_list(fsdp, tag) == pytest.approx(_scalar_list(one, tag), abs=1e-5, rel=1e-4), tag


@pytest.mark.slow
def test_dapo_batch_std_with_accumulation_on_two_ranks_equals_one_process(tmp_path):
    """``aggregation: dapo`` and ``advantage: batch_std`` are step-level: DAPO divides by the completion tokens of
    every micro-batch on every rank, batch_std takes the std of every reward of the step. One process over 4
    micro-batches (accumulate 4) and 2 DDP ranks over 2 each (accumulate 2) see the same 4 prompts a step and
    must make the same updates: a normaliser or a std taken per micro-batch or per rank (a plausible bug) would
    change the final weights. Compared: each step's prompts and the final logits of a fixed input, 1e-5.
    """
    dapo = ["--model.init_args.group_size=4", "--model.init_args.max_new_tokens=12",
            "--trainer.callbacks+=helpers_ddp.ScriptedRollouts", "--trainer.callbacks+=helpers_ddp.LengthReward",
            "--model.init_args.aggregation=dapo", "--model.init_args.advantage=batch_std",
            "--data.group_by_length=false"]  # fmt: skip
    one, (single,), one_dir = _fit(tmp_path, "one", "grpo.yaml", 2, 1, *dapo, "--trainer.accumulate_grad_batches=4")
    ddp, ranks, ddp_dir = _fit(tmp_path, "ddp", "grpo.yaml", 2, 1, *TWO_CPUS, *DDP, *dapo,
                               "--trainer.accumulate_grad_batches=2")  # fmt: skip
    for step in ("0", "1"):
        assert len(single["batches"][step]) == 4 and all(len(r["batches"][step]) == 2 for r in ranks)
        assert sorted(ranks[0]["batches"][step] + ranks[1]["batches"][step]) == sorted(single["batches"][step])
    assert len(_losses(ddp)) == len(_losses(one)) == 2
    reference = torch.load(one_dir / "logits.pt", weights_only=True)
    from transformers import AutoModelForCausalLM

    from qgen.models import embedded_path

    start = _logits(AutoModelForCausalLM.from_pretrained(embedded_path()).eval())
    assert (reference - start).abs().max() > 1e-3  # the two steps moved the policy
    torch.testing.assert_close(torch.load(ddp_dir / "logits.pt", weights_only=True), reference, atol=1e-5, rtol=1e-5)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ShardDump.IDS])).logits.float()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """4 SFT steps straight in one process (4 examples per step); its run folder."""
    run, _, _ = _fit(tmp_path_factory.mktemp("one-process"), "straight", "sft.yaml", 4, 4)
    return run


@pytest.fixture(scope="module")
def straight_losses(straight_run):
    """The losses of :func:`straight_run`: what every 2-rank layout's 2 steps + 2 resumed steps must reproduce."""
    losses = _losses(straight_run)
    assert len(losses) == 4 and len(set(losses)) == 4
    return losses


def _resumes_exactly(tmp_path, layout, straight):
    """2 steps on 2 ranks of ``layout``, then ``--ckpt_path`` for 2 more: the 4 losses are those of 4 steps
    straight in one process (``straight``, to 1e-5: only the ranks' reduction order differs).
    Returns the resumed run's last checkpoint, the 2-step checkpoint and the resumed run's final logits.
    """
    first, _, _ = _fit(tmp_path, "split", "sft.yaml", 2, 2, *TWO_CPUS, *layout)
    ckpt = first / "checkpoints" / "last.ckpt"
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    proc = run_qgen(_stage_args("sft.yaml", tmp_path / "split", 4, "--data.batch_size=2", *TWO_CPUS, *layout,
                                f"--ckpt_path={ckpt}"), env=_env(resumed_dir))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = tmp_path / "split" / "lightning_logs" / "version_1"
    assert _losses(resumed) == pytest.approx(straight[2:], abs=1e-5, rel=1e-5)
    assert _losses(first) == pytest.approx(straight[:2], abs=1e-5, rel=1e-5)
    return resumed / "checkpoints" / "last.ckpt", ckpt, torch.load(resumed_dir / "logits.pt")


def _predicts_as_one_process(tmp_path, ckpt, layout):
    """Greedy ``predict`` with ``ckpt`` on 2 ranks of ``layout`` writes the same text for every prompt as one
    process, each prompt once.
    """
    from conftest import write_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "subject": "Algebra"} for i in range(5)])
    written = {}
    for name, args in (("one", []), ("sharded", [*TWO_CPUS, *layout])):
        output = tmp_path / f"pred-{name}.jsonl"
        proc = run_qgen(["predict", "--config", os.path.join(CONFIGS, "sft.yaml"), *LORA, *args,
                         f"--ckpt_path={ckpt}", "--data.predict_prompts", prompts,
                         "--data.batch_size=2", "--trainer.logger=false", *QUIET,
                         "--trainer.callbacks+=callbacks.PredictionWriter", f"--trainer.callbacks.output={output}",
                         "--model.init_args.generation.max_new_tokens=16",
                         "--model.init_args.generation.temperature=0"], cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        written[name] = {row["key"]: row["text"] for row in rows}
        assert len(rows) == 5
    assert sorted(written["one"]) == [f"p{i}#0" for i in range(5)] and written["sharded"] == written["one"]


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_exactly_and_loads_in_one_process(tmp_path, straight_losses):
    from qgen.models import load_from_checkpoint

    last, ckpt, trained = _resumes_exactly(tmp_path, FSDP2, straight_losses)
    state = torch.load(ckpt, weights_only=True)
    # one file, the adapter alone, every tensor whole (gathered), optimizer state for each of them
    names = list(state["state_dict"])
    assert names and all("lora_" in n for n in names)
    assert state["state_dict"][names[0]].shape[0] in (8, 256)  # r rows (A) or hidden rows (B): not a half
    assert len(state["optimizer_states"][0]["state"]) == len(names)

    # the world-size-2 checkpoint in one process (export / predict path): the same logits as the last step's
    logits = _logits(load_from_checkpoint(str(last), merge=False))
    assert torch.allclose(logits, trained, atol=1e-5)
    assert not torch.allclose(logits, _logits(load_from_checkpoint(str(ckpt), merge=False)), atol=1e-5)  # 2 earlier

    # exported as a PEFT adapter folder, it loads in plain transformers + peft with the same logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qgen.export import export

    export(str(last), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    assert torch.allclose(_logits(PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()), trained,
                          atol=1e-5)  # fmt: skip


@pytest.mark.slow
def test_fsdp1_checkpoint_resumes_exactly_and_loads_in_one_process(tmp_path, straight_losses, straight_run):
    """FSDP1 gathers the adapter one unit at a time into one file (and the optimizer state by name): it resumes
    exactly at 2 ranks, gives the trained logits in one process, and predicts on 2 ranks as one process does.
    """
    from qgen.models import load_from_checkpoint

    last, ckpt, trained = _resumes_exactly(tmp_path, FSDP1, straight_losses)
    state = torch.load(ckpt, weights_only=True)
    # every adapter tensor whole and under its unwrapped name; the optimizer's moments whole beside it
    from qgen.models import LoraSpec, load_causal_lm

    unwrapped = load_causal_lm(None, LoraSpec(r=8, dropout=0.0), device="cpu")
    assert {n: tuple(v.shape) for n, v in state["state_dict"].items()} == {
        f"model.{n}": tuple(p.shape) for n, p in unwrapped.named_parameters() if p.requires_grad
    }
    moments = state["optimizer_states"][0]["state"]
    assert all(moments[n]["exp_avg"].shape == v.shape for n, v in state["state_dict"].items())
    assert torch.allclose(_logits(load_from_checkpoint(str(last), merge=False)), trained, atol=1e-5)
    _predicts_as_one_process(tmp_path, last, FSDP1)  # greedy generation over FSDP1 units (synced_gpus)

    # a checkpoint of another strategy (one process: its optimizer state is keyed by position, not by name) is
    # refused when resuming under FSDP1, with one line that says so, and nothing is trained
    other = straight_run / "checkpoints" / "last.ckpt"
    refused = tmp_path / "refused"
    refused.mkdir()
    proc = run_qgen(_stage_args("sft.yaml", refused, 6, "--data.batch_size=2", *TWO_CPUS, *FSDP1,
                                f"--ckpt_path={other}"), env=_env(refused))  # fmt: skip
    assert proc.returncode != 0
    assert "its optimizer state is not keyed by this run's trainable weights" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not list(refused.glob("shard_rank*.json"))


@pytest.mark.slow
def test_fsdp1_qlora_overlay_trains_as_shipped(tmp_path):
    """configs/strategy/fsdp-qlora.yaml as shipped (NF4 weights stored in bf16, bf16 compute) on 2 CPU ranks:
    the 4-bit base is sharded and bit-identical after training, only the adapter is optimised and saved, and
    the losses follow one process's QLoRA run (to 1e-3: under FSDP1 the norms, embeddings and output layer
    compute in bf16, where peft's k-bit preparation keeps them in float32).
    """
    qlora = ["--model.init_args.quantization=nf4", "--model.init_args.dtype=bfloat16"]
    one, (single,), _ = _fit(tmp_path, "one", "sft.yaml", 3, 4, *qlora)
    run, ranks, _ = _fit(tmp_path, "fsdp1", "sft.yaml", 3, 2, *TWO_CPUS, *FSDP1_QLORA)
    assert _losses(run) == pytest.approx(_losses(one), rel=1e-3)
    # rank 1 built its model on the meta device and took rank 0's 4-bit layout and weights (one host copy per
    # node): the same losses as a run where every rank loads and quantizes the model itself
    per_rank, _, _ = _fit(tmp_path, "per_rank", "sft.yaml", 3, 2, *TWO_CPUS, *FSDP1_QLORA,
                          "--trainer.strategy.init_args.one_host_copy=false")  # fmt: skip
    assert _losses(run) == pytest.approx(_losses(per_rank), abs=1e-5)
    assert [info["built_empty"] for info in ranks] == [False, True]
    for info in ranks:
        assert info["sharded"] > 0 and info["frozen_unchanged"] and info["optimizer_all_trainable"]
        assert info["local_numel"] < 0.5 * single["full_numel"]
        assert info["optimizer_tensors"] == info["trainable_tensors"] == single["trainable_tensors"]
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert len(state) == single["trainable_tensors"] and all(v.dtype == torch.float32 for v in state.values())


# a random-init Qwen3 of 602M parameters (84 thin layers, small vocabulary): its float32 weights (2.4 GB) dwarf
# what every rank holds besides them (two gathered layers in backward, the LoRA state: about 0.3 GB)
ARCH_600M = {"model_type": "qwen3", "vocab_size": 4096, "hidden_size": 768, "intermediate_size": 2304,
             "num_hidden_layers": 84, "num_attention_heads": 12, "num_key_value_heads": 6, "head_dim": 64,
             "tie_word_embeddings": False, "max_position_embeddings": 2048}  # fmt: skip


@pytest.mark.slow
def test_fsdp1_keeps_one_host_copy_per_node_and_trains_as_one_copy_per_rank(tmp_path):
    """FSDP1, 2 CPU ranks, a random-init 602M-parameter Qwen3 in float32 with LoRA: with one host copy per node
    (the default) rank 1 builds on the meta device and receives its shards, so its peak resident memory above
    its after-import baseline is at most 0.6 x rank 0's (which draws the whole model); the losses equal those of
    the run where every rank draws the model itself to 1e-5, and there both ranks peak alike.
    (glibc's adaptive mmap threshold is pinned so that freed buffers leave the resident set: the peak then
    measures what was held, not the allocator's caching.)
    """
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(ARCH_600M))
    runs = {}
    for name, copies in (("one_copy", "true"), ("per_rank", "false")):
        folder = tmp_path / name
        folder.mkdir()
        args = ["fit", "--config", os.path.join(CONFIGS, "sft.yaml"), *TWO_CPUS, *FSDP1, *QUIET,
                f"--model.init_args.model_name_or_path=random:{arch}", "--model.init_args.gradient_checkpointing=true",
                "--model.init_args.lora.r=8", "--model.init_args.lora.dropout=0.0",
                "--model.init_args.lora.target_modules=[q_proj,v_proj]", "--data.batch_size=1", "--data.max_length=64",
                "--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
                f"--trainer.logger.init_args.save_dir={folder}", "--trainer.callbacks+=helpers_ddp.HostMemoryDump",
                f"--trainer.strategy.init_args.one_host_copy={copies}"]  # fmt: skip
        proc = run_qgen(args, env={**_env(folder), "MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        hosts = [json.loads((folder / f"host_rank{r}.json").read_text()) for r in (0, 1)]
        runs[name] = (_losses(folder / "lightning_logs" / "version_0"), [h["peak"] - h["after_import"] for h in hosts])
    (losses, (rank0, rank1)), (per_rank_losses, (per0, per1)) = runs["one_copy"], runs["per_rank"]
    assert len(losses) == 2 and losses == pytest.approx(per_rank_losses, abs=1e-5)
    assert rank0 > 2.4e9 and rank1 <= 0.6 * rank0, (rank0, rank1)
    assert per1 > 0.9 * per0  # the contrast: every rank held the whole model


@pytest.mark.slow
def test_grpo_samples_and_trains_the_same_in_one_process_under_ddp_and_under_fsdp1(tmp_path):
    """hf sampling, 3 steps: one process x 2 prompts, DDP x 2 and FSDP1 x 2 (1 prompt per rank) sample the same
    completions for every prompt at every step, step 2 included (weights changed twice; per-request seeds, not
    the rank's RNG: a rank-seeded sampler fails here), and the losses are equal. Over FSDP1's sharded layers
    every rank decodes until all are done (synced_gpus), nothing hangs.
    """
    grpo = ["--model.init_args.group_size=4", "--model.init_args.max_new_tokens=24",
            "--trainer.callbacks+=helpers_ddp.RolloutDump"]  # fmt: skip
    one, _, one_dir = _fit(tmp_path, "one", "grpo.yaml", 3, 2, *grpo)
    ddp, _, ddp_dir = _fit(tmp_path, "ddp", "grpo.yaml", 3, 1, *TWO_CPUS, *DDP, *grpo)
    run, ranks, fsdp_dir = _fit(tmp_path, "fsdp1", "grpo.yaml", 3, 1, *TWO_CPUS, *FSDP1, *grpo)
    assert all(info["frozen_unchanged"] and info["sharded"] > 0 for info in ranks)
    rollouts = [json.loads((fsdp_dir / f"rollouts_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(len(texts) == 4 for rank in rollouts for step in rank.values() for texts in step.values())
    per_rank = [json.loads((ddp_dir / f"rollouts_rank{r}.json").read_text()) for r in (0, 1)]
    assert rollouts == per_rank
    merged: dict = {}
    for rank in per_rank:
        for step, prompts in rank.items():
            merged.setdefault(step, {}).update(prompts)
    single = json.loads((one_dir / "rollouts_rank0.json").read_text())
    assert sorted(single) == ["0", "1", "2"] and all(len(single[s]) == 2 for s in single)
    assert merged == single
    assert len(_losses(run)) == 3 and len(set(_losses(one))) == 3
    assert _losses(ddp) == pytest.approx(_losses(one), abs=1e-5, rel=1e-5)
    assert _losses(run) == pytest.approx(_losses(ddp), abs=1e-5, rel=1e-5)


@pytest.mark.slow
def test_distillation_on_and_off_policy_equals_across_one_process_ddp_and_fsdp2(tmp_path):
    """Distillation with ``lmbda`` 0.5 (seed 42: steps 0 and 2 on-policy, step 1 off-policy), 3 steps of 2
    examples: one process, DDP x 2 and FSDP2 x 2 (a sharded student and teacher) give the same losses and
    per-token divergence on both kinds of step. On-policy steps sample from the student with per-request seeds
    (step 2 after two updates: the same completions whichever rank samples them), and the token normaliser is the
    step's tokens over both ranks; off-policy steps normalise by the step's target tokens.
    """
    distill = ["--model.init_args.lmbda=0.5", "--model.init_args.on_policy_start=0",
               "--model.init_args.teacher=embedded:default", "--data.group_by_length=false",
               "--model.init_args.generation.max_new_tokens=16"]  # fmt: skip
    one, _, _ = _fit(tmp_path, "one", "distill.yaml", 3, 2, *distill)
    ddp, _, _ = _fit(tmp_path, "ddp", "distill.yaml", 3, 1, *TWO_CPUS, *DDP, *distill)
    fsdp, ranks, _ = _fit(tmp_path, "fsdp2", "distill.yaml", 3, 1, *TWO_CPUS, *FSDP2, *distill)
    for run in (one, ddp, fsdp):
        assert scalars(run, "train/on_policy") == {0: 1.0, 1: 0.0, 2: 1.0}
    assert all(info["frozen_unchanged"] and info["sharded"] > 0 for info in ranks)
    reference = _losses(one)
    assert len(reference) == 3 and min(reference) > 1e-3  # mini student vs default teacher: KL ~ 0.02
    for run in (ddp, fsdp):
        assert _losses(run) == pytest.approx(reference, abs=1e-6, rel=1e-4)
        assert _scalar_list(run, "train/divergence") == pytest.approx(_scalar_list(one, "train/divergence"), rel=1e-4)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_resumes_exactly_and_two_nodes_of_one_process_equal_one_node_of_two(tmp_path, straight_losses):
    """DDP on 2 ranks: 2 steps + 2 resumed steps are 4 steps straight, and the checkpoint gives the trained
    logits in one process. Then ``configs/launch/torchrun.sh`` on this machine as two "nodes" of one process
    each (gloo): the ranks, the data shards and the losses are those of the one node running 2 processes.
    """
    from qgen.models import load_from_checkpoint

    last, _, trained = _resumes_exactly(tmp_path, DDP, straight_losses)
    assert torch.allclose(_logits(load_from_checkpoint(str(last), merge=False)), trained, atol=1e-5)

    one_node = tmp_path / "split"  # the first 2 steps above, one node of 2 processes
    node_ranks = [json.loads((one_node / f"shard_rank{r}.json").read_text()) for r in (0, 1)]
    folder = tmp_path / "two-nodes"
    folder.mkdir()
    extra = _stage_args("sft.yaml", folder, 2, "--data.batch_size=2", "--trainer.accelerator=cpu")[3:]  # no fit/config
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **_env(folder), "NNODES": "2", "GPUS_PER_NODE": "1",
               "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "CONFIG": os.path.join(CONFIGS, "sft.yaml"), "STRATEGY": "ddp", "PYTHON": sys.executable}  # fmt: skip
        procs.append(subprocess.Popen(["bash", os.path.join(CONFIGS, "launch", "torchrun.sh"), *extra], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    ranks = [json.loads((folder / f"shard_rank{r}.json").read_text()) for r in (0, 1)]
    assert os.listdir(folder / "lightning_logs") == ["version_0"]  # node 1 claimed no run folder
    for step in ("0", "1"):
        a, b = set(ranks[0]["batches"][step]), set(ranks[1]["batches"][step])
        assert not a & b  # no example seen twice
        assert a == set(node_ranks[0]["batches"][step]) and b == set(node_ranks[1]["batches"][step])
    two_nodes = _losses(folder / "lightning_logs" / "version_0")
    assert len(two_nodes) == 2
    assert two_nodes == pytest.approx(_losses(one_node / "lightning_logs" / "version_0"), abs=1e-6)


def test_the_slurm_template_runs_the_fit_that_its_comments_describe(capsys):
    """The sbatch file: requeue on SIGUSR1 before the time limit, one task per GPU, and a qgen command line
    that parses with every shipped stage config and strategy overlay.
    """
    import re

    from qgen.cli import cli_main

    text = open(os.path.join(CONFIGS, "launch", "slurm.sbatch"), encoding="utf-8").read()
    assert re.search(r"^#SBATCH --signal=SIGUSR1@\d+$", text, re.M) and "#SBATCH --requeue" in text
    assert re.search(r"^#SBATCH --ntasks-per-node=(\d+)$", text, re.M).group(1) == \
        re.search(r"^#SBATCH --gpus-per-node=(\d+)$", text, re.M).group(1)  # fmt: skip
    command = text[text.index("srun python -m qgen fit") :].replace("\\\n", " ").split()
    for stage in ("qwen3-14b-sft.yaml", "qwen3-14b-grpo.yaml"):
        for strategy in ("ddp", "fsdp2-lora", "fsdp-qlora"):
            values = {"$CONFIG": os.path.join(CONFIGS, stage), "$STRATEGY": strategy, "$SLURM_NNODES": "2",
                      "$SLURM_NTASKS_PER_NODE": "8", "$@": ""}  # fmt: skip
            args = [a.replace('"', "") for a in command[5:]]
            for key, value in values.items():
                args = [a.replace(key, value) for a in args]
            args = [a.replace("configs/", CONFIGS + "/", 1) if a.startswith("configs/") else a for a in args if a]
            with pytest.raises(SystemExit) as exit_info:
                cli_main(["fit", *args, "--print_config"])
            assert exit_info.value.code in (0, None)
            printed = capsys.readouterr().out
            assert "num_nodes: 2" in printed and "devices: '8'" in printed
