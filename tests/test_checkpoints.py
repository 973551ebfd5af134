"""Checkpoint safety: no code runs on load, atomic writes survive a kill, resume picks a good file of the right
stage, partial weight matches are errors, concurrent runs never share a folder, bad paths fail before any folder.
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import CONFIGS, ROOT, run_qgen

from callbacks import DifficultyReward
from qgen.checkpointing import CheckpointError, atomic_torch_save, load_checkpoint_file
from qgen.cli import claim_version_dir, find_last_checkpoint
from qgen.records import Question
from qgen.scoring import DifficultyModel


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: what a crafted checkpoint would do with os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_folder_is_refused_by_name(tmp_path):
    """Sharded (distributed-checkpoint) folders carry pickled metadata: every strategy's load refuses them."""
    (tmp_path / "last.ckpt").mkdir()
    with pytest.raises(CheckpointError, match="last.ckpt is a folder"):
        load_checkpoint_file(str(tmp_path / "last.ckpt"))


def test_a_checkpoint_with_a_pickle_payload_is_refused_and_runs_nothing(tmp_path, capsys):
    import pickle

    marker = tmp_path / "pwned"
    bad = tmp_path / "logs" / "version_1" / "checkpoints" / "last.ckpt"
    bad.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": {"_class_path": "qgen.GRPOModule"}, "x": Payload(str(marker))}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint_file(str(bad))
    # --ckpt_path last skips it with a warning naming it
    with pytest.raises(FileNotFoundError):
        find_last_checkpoint(str(tmp_path / "logs"), "qgen.GRPOModule")
    assert str(bad) in capsys.readouterr().err
    # the old route: pickled bytes in a uint8 tensor inside the callback state (passes weights_only=True)
    payload = torch.frombuffer(bytearray(pickle.dumps(Payload(str(marker)))), dtype=torch.uint8)
    with pytest.raises(ValueError, match="pickled bytes"):
        DifficultyReward().load_state_dict({"model": payload})
    assert not marker.exists()


def _records():
    easy = [Question(str(i), "t", "en", "m", "p", f"What is {i} plus {i}?", str(2 * i), "Add.", difficulty=0.0)
            for i in range(30)]  # fmt: skip
    hard = [Question(f"h{i}", "t", "en", "m", "p", f"Prove that for all integers n > {i} the sum is maximal.", "x",
                     "Since ... therefore ... hence " * 5, difficulty=1.0) for i in range(30)]  # fmt: skip
    return easy + hard


def test_difficulty_model_round_trips_as_plain_values(tmp_path):
    model = DifficultyModel().fit(_records())
    callback = DifficultyReward()
    callback.model = model
    path = tmp_path / "state.pt"
    torch.save(callback.state_dict(), path)
    restored = DifficultyReward()
    restored.load_state_dict(torch.load(path, weights_only=True))
    questions = ["What is 3 plus 4?", "Prove that for all integers n the sum is maximal."]
    analyses = ["Add.", "Since x, therefore y, hence z."]
    np.testing.assert_allclose(restored.model.predict(questions, analyses), model.predict(questions, analyses), atol=1e-6)
    assert model.predict(questions, analyses)[1] > model.predict(questions, analyses)[0] + 0.3


KILL_DURING_WRITE = """
import os, sys, torch
from qgen.checkpointing import atomic_torch_save
path = sys.argv[1]
real_fsync = os.fsync
def die(fd):
    os._exit(9)  # killed after the new bytes were written, before they were made durable and renamed
os.fsync = die
atomic_torch_save({"step": 2, "w": torch.ones(1000)}, path)
"""


def test_a_kill_during_the_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpts" / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.zeros(1000)}, str(path))
    # $TMPDIR on another (here: missing) filesystem must not matter: the temporary file lives beside the checkpoint
    env = {**os.environ, "TMPDIR": str(tmp_path / "no-such-tmp"), "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert load_checkpoint_file(str(path))["step"] == 1  # the previous good checkpoint, complete
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE.replace("os.fsync = die", ""), str(path)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint_file(str(path))["step"] == 2


def test_ckpt_path_last_skips_an_empty_last_ckpt_and_takes_the_newest_good_one(tmp_path, capsys):
    import time

    good = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    good.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": {"_class_path": "qgen.SFTModule"}}, good)
    time.sleep(0.01)
    empty = tmp_path / "version_1" / "checkpoints" / "last.ckpt"
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    assert find_last_checkpoint(str(tmp_path), "qgen.SFTModule") == str(good)
    assert f"skipping {empty}" in capsys.readouterr().err


def test_concurrent_runs_claim_distinct_version_folders(tmp_path):
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)
    got, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        got.append(claim_version_dir(str(tmp_path), "lightning_logs"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 9))


@pytest.mark.slow
def test_a_checkpoint_of_another_stage_and_bad_paths_fail_at_start_with_one_line(tmp_path):
    sft = tmp_path / "sft.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "qgen.SFTModule", "model_name_or_path": None}}, sft)
    base = ["fit", "--config", os.path.join(CONFIGS, "grpo.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"]
    proc = run_qgen([*base, "--ckpt_path", str(sft)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "written by qgen.SFTModule, but this run is qgen.GRPOModule" in proc.stderr and "init_from" in proc.stderr
    for bad in (["--ckpt_path", str(tmp_path / "nope.ckpt")], ["--model.init_args.init_from", str(tmp_path / "nope")]):
        proc = run_qgen([*base, *bad])
        assert proc.returncode == 2 and "nope" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "lightning_logs").exists() or not os.listdir(tmp_path / "lightning_logs")


def test_a_partial_weight_match_is_an_error_naming_the_tensors(tmp_path):
    from qgen.models import LoraSpec, load_causal_lm, load_trainable_weights

    model = load_causal_lm(None, LoraSpec(r=8, alpha=16, dropout=0.0))
    state = {f"model.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"state_dict": state}, tmp_path / "ok.ckpt")
    assert load_trainable_weights(model, str(tmp_path / "ok.ckpt")) == len(state)
    partial = dict(list(state.items())[:-2])
    torch.save({"state_dict": partial}, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match="trainable but absent"):
        load_trainable_weights(model, str(tmp_path / "partial.ckpt"))
    other = load_causal_lm(None, LoraSpec(r=4, alpha=8, dropout=0.0))
    with pytest.raises(ValueError, match="other shapes"):
        load_trainable_weights(other, str(tmp_path / "ok.ckpt"))
