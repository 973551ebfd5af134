"""The memory pre-flight and the model-files check of ``fit`` (qgen.preflight): before any weight is read."""

import os
import time

import pytest
import yaml
from conftest import CONFIGS, run_qgen

from qgen import preflight as pf
from qgen.plan import GB, _merge, plan, workload_from_config


def _config(*names, **overrides):
    merged: dict = {}
    for name in names:
        with open(os.path.join(CONFIGS, name), encoding="utf-8") as fh:
            _merge(merged, yaml.safe_load(fh))
    for dotted, value in overrides.items():
        node = merged
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return merged


def _free(monkeypatch, gb, where="free on cuda:0"):
    monkeypatch.setattr(pf, "free_device_memory", lambda accelerator, devices: (gb * GB, where))


def test_the_verdict_is_the_plans_total_and_the_fix_is_checked_by_the_planner(monkeypatch):
    """14B QLoRA SFT (19.7 GB planned on one GPU, `qgen plan`'s ddp column) on a GPU with 16 GB free: refused,
    the largest term named, and the suggested change is the first of the tried ones whose plan is under 90% of
    16 GB (checked here against plan() itself); with 40 GB free it fits.
    """
    config = _config("qwen3-14b-sft.yaml")
    w = workload_from_config(config)
    want = plan(w, 1, 16 * GB)["ddp"]
    _free(monkeypatch, 16)
    verdict = pf.preflight(config)
    assert verdict.planned == pytest.approx(want["total"]) and verdict.column == "ddp"
    assert verdict.largest == ("base weights", want["base weights"])
    assert not verdict.fits and verdict.planned > 0.9 * 16 * GB
    assert verdict.fix is not None
    tried = pf.suggestions(w, "ddp", 1, "cuda")
    fitting = [flags for flags, cand, col, n in tried if plan(cand, n, 16 * GB)[col]["total"] <= 0.9 * 16 * GB]
    first_fitting = fitting[0]
    assert verdict.fix.startswith(first_fitting)
    line = verdict.line()
    assert f"{want['total'] / GB:.1f} GB per device" in line and "16.0 GB is free on cuda:0" in line
    _free(monkeypatch, 40)
    assert pf.preflight(config).fits


def test_sharded_strategy_is_planned_per_device_and_cpu_ranks_share_the_host(monkeypatch):
    """The FSDP1 overlay on 4 GPUs is planned from the planner's fsdp-qlora column at 4 devices; on the CPU the
    host's available memory is divided among the ranks.
    """
    config = _config("qwen3-14b-sft.yaml", "strategy/fsdp-qlora.yaml", **{"trainer.devices": 4})
    _free(monkeypatch, 80)
    verdict = pf.preflight(config)
    assert verdict.column == "fsdp-qlora" and verdict.devices == 4
    assert verdict.planned == pytest.approx(plan(workload_from_config(config), 4, 80 * GB)["fsdp-qlora"]["total"])
    monkeypatch.undo()
    monkeypatch.setattr(pf, "available_host_memory", lambda: 64 * GB)
    assert pf.free_device_memory("cpu", 4) == (16 * GB, "available host memory / 4 ranks")


def test_nothing_that_fits_is_said_so(monkeypatch):
    _free(monkeypatch, 2)
    verdict = pf.preflight(_config("qwen3-14b-sft.yaml"))
    assert verdict.fix is None and "no single change tried fits" in verdict.line()


def test_an_unknown_architecture_is_not_planned_and_the_run_goes_on(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pf._hub_config.cache_clear()
    config = _config("sft.yaml", **{"model.init_args.model_name_or_path": "nobody/no-such-model"})
    assert pf.run_preflight(config, "refuse") is None
    assert "memory pre-flight skipped: model nobody/no-such-model" in capsys.readouterr().err
    with pytest.raises(pf.PreflightError, match=r"model nobody/no-such-model: not in the Hugging Face cache .*OFFLINE"):
        pf.check_model_files("nobody/no-such-model")
    pf.check_model_files(None, "embedded:mini", CONFIGS)  # embedded presets and local folders need no hub


def _fourteen_b(tmp_path, *extra):
    """The issue's command, with an empty Hugging Face cache (Qwen3-14B is nowhere on this machine); on a host
    with more available memory than the bf16 14B plan, more CPU ranks share it until it does not fit.
    """
    ranks = 1
    while pf.available_host_memory() / ranks * 0.9 >= 40.5 * GB:
        ranks *= 2
    args = ["fit", "--config", os.path.join(CONFIGS, "qwen3-14b-sft.yaml"), "--trainer.accelerator=cpu",
            "--model.init_args.quantization=null", f"--trainer.logger.init_args.save_dir={tmp_path}",
            *([f"--trainer.devices={ranks}"] if ranks > 1 else []), *extra]  # fmt: skip
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    proc = run_qgen(args, env=env, timeout=120)
    return proc, time.monotonic() - start


@pytest.mark.slow
def test_a_bf16_14b_on_this_cpu_is_refused_in_one_line_before_any_file_is_read(tmp_path):
    proc, seconds = _fourteen_b(tmp_path)
    assert proc.returncode == 2 and seconds < 60
    lines = [line for line in proc.stderr.splitlines() if line.startswith("qgen:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("qgen: error: out of memory before it starts: the run plans 40.5 GB per device")
    assert "available host memory" in lines[0] and "largest term: base weights 29.5 GB" in lines[0]
    assert not (tmp_path / "lightning_logs").exists()  # no run folder
    assert not any(files for _, _, files in os.walk(tmp_path / "hf"))  # nothing downloaded, nothing cached

    # warn: the same line as a warning, and the run goes on to the model's files, which are not there: one line
    proc, seconds = _fourteen_b(tmp_path, "--preflight", "warn")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("qgen:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 2
    assert lines[0].startswith("qgen: warning: the run plans 40.5 GB per device")
    assert lines[1].startswith("qgen: error: model Qwen/Qwen3-14B: not in the Hugging Face cache")
    assert str(tmp_path / "hf") in lines[1]


def test_a_vllm_engine_on_the_cpu_is_its_weights_and_its_fixed_kv_cache(monkeypatch):
    """On a CPU machine the engine takes kv_cache_gib, not gpu_memory_utilization of an 80 GB GPU (24 GB)."""
    from dataclasses import replace

    from qgen.plan import engine_bytes

    config = _config("grpo.yaml", **{"model.init_args.backend": "vllm", "model.init_args.vllm": {"kv_cache_gib": 1},
                                     "trainer.accelerator": "cpu"})  # fmt: skip
    _free(monkeypatch, 20, "available host memory")
    w = workload_from_config(config)
    on_cpu = replace(w, engine_kv_bytes=2**30)
    weights = on_cpu.arch.params() * 4  # the merged fp32 model
    assert engine_bytes(on_cpu, 80 * GB) == pytest.approx(weights + 2**30, rel=0.05)
    verdict = pf.preflight(config)
    assert verdict.fits and verdict.planned == pytest.approx(plan(on_cpu, 1, 80 * GB)["ddp"]["total"])
    assert verdict.planned < 3 * GB < plan(w, 1, 80 * GB)["ddp"]["total"]
