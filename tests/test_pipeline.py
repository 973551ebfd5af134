"""The README's main command, shortened: SFT -> GRPO -> distillation -> generated questions with scores."""

import json

import yaml
from conftest import run_qgen


def test_pipeline_runs_every_stage_and_prints_scored_questions(tmp_path):
    done = run_qgen(["pipeline", "--sft-steps", "8", "--grpo-steps", "2", "--distill-steps", "4", "--root", str(tmp_path)],
                    timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    logs = tmp_path / "lightning_logs"
    for version in range(3):
        assert (logs / f"version_{version}" / "checkpoints" / "last.ckpt").exists()
    grpo_config = yaml.safe_load((logs / "version_1" / "config.yaml").read_text())
    distill_config = yaml.safe_load((logs / "version_2" / "config.yaml").read_text())
    assert grpo_config["model"]["init_args"]["init_from"] == str(logs / "version_0" / "checkpoints" / "last.ckpt")
    assert distill_config["model"]["init_args"]["teacher"] == str(logs / "version_1" / "checkpoints" / "last.ckpt")
    for stage in ("grpo", "distill"):
        with open(logs / "pipeline" / f"predictions_{stage}.jsonl", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh]
        assert len(rows) == 7  # data/prompts/sample.jsonl asks for 2 + 1 + 1 + 2 + 1 questions
        assert all({"difficulty", "rigor", "novelty", "educational_value"} <= set(r["scores"]) for r in rows)
        # the sampling temperature of the command wins over the one in the checkpoint (1.0 in both configs)
        assert all(r["generation"]["temperature"] == 0.7 for r in rows)
    assert "questions written by the distilled student" in done.stdout
    assert done.stdout.count("| difficulty ") == 14
    assert "stage seconds: sft" in done.stdout
