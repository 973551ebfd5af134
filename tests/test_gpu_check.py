"""benchmarks/gpu_check.py --dry: the one-shot CUDA check runs its every part on the CPU (the embedded default,
the same commands and parsing), so it cannot rot between visits to a GPU.
"""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_dry_run_records_every_part_with_its_figures(tmp_path):
    out = tmp_path / "check" / "X.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["dry"] is True and results["machine"]["device"] == "cpu"
    for key in "abcde":
        assert results[key]["status"] == "ok", (key, results[key].get("error", "")[-2000:])
        assert results[key]["seconds"] > 0 and results[key]["title"]
    for key in "ab":  # the run's own peak against the pre-flight's plan of the same run
        figures = results[key]["figures"]
        assert figures["peak_gb"] > 0.1 and figures["planned_gb"] > 0.1
        assert figures["peak_vs_plan"] == pytest.approx(figures["peak_gb"] / figures["planned_gb"], abs=0.01)
    assert results["a"]["figures"]["tokens_per_s"] > 0 and results["b"]["figures"]["gen_tokens_per_s"] > 0
    assert results["c"]["figures"]["sft_vs_trl_gpu"] > 0 and results["c"]["figures"]["grpo_vs_trl_gpu"] > 0
    assert results["c"]["figures"]["grpo_gen_tokens_per_step"] == 2 * 8 * 8  # 2 prompts x G 8 x 8 tokens, EOS off
    assert {"qgen_peak_mb", "trl_chunked_peak_mb", "logprob_mem_vs_trl_gpu"} <= set(results["d"]["figures"])
    assert results["e"]["figures"]["skipped"] >= 1 and results["e"]["figures"]["passed"] == 0  # no GPU here
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("parts_ok=5 sft_vs_trl_gpu=") and "logprob_mem_vs_trl_gpu=" in last
    table = out.with_suffix(".md").read_text()
    assert "DRY RUN" in table and all(f"| {key} |" in table for key in "abcde")


def test_a_part_out_of_time_is_recorded_and_the_next_one_runs(tmp_path):
    out = tmp_path / "X.json"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry", "--out", str(out), "--only", "a", "d", "--budget-scale",
           "0.005"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    # budgets of 130 and 30 s, x 0.005, x 3 for a dry run: 1.95 and 0.45 s
    assert results["a"]["status"] == "timeout (2.0 s)" and results["d"]["status"].startswith("timeout (0.")
    assert results["a"]["seconds"] < 10 and "b" not in results and "| d |" in out.with_suffix(".md").read_text()
