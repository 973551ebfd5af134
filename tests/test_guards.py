"""Fail fast, never silently: the hang watchdog (qgen.watchdog, callbacks.HangWatchdog) and the non-finite
guard (callbacks.FiniteGuard).
"""

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import CONFIGS, ROOT

from qgen import watchdog as wd


class Exited(Exception):
    pass


def _raise(code):
    raise Exited(code)


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_stage_past_its_deadline_names_itself_and_exits(capsys):
    dog = wd.Watchdog(rank=0, world_size=1, peer_timeout=60, deadlines={"generation": 0.0}, exit_fn=_raise)
    token = dog.enter("generation")
    time.sleep(0.01)
    assert dog.overdue(time.monotonic())[0] == "generation"
    with pytest.raises(Exited, match="3"):
        dog.fail("rank 0: generation has run for 1 s, past its deadline of 0 s (step 0); stopping every rank")
    dog.leave(token)
    assert dog.overdue(time.monotonic()) is None
    assert capsys.readouterr().err.strip() == (
        "qgen: error: rank 0: generation has run for 1 s, past its deadline of 0 s (step 0); stopping every rank")


def test_stage_marks_are_kept_per_thread_and_named_in_the_heartbeat():
    dog = wd.Watchdog(rank=0, world_size=1, peer_timeout=60, exit_fn=_raise)
    wd._active = dog
    try:
        with wd.stage("generation"):
            assert dog.where() == "generation"
            with wd.stage("scoring"):
                assert dog.where() == "generation, scoring"
        assert dog.where() == "training"
    finally:
        wd._active = None


def test_a_peer_that_stops_beating_is_named_within_the_timeout_and_launched_processes_are_killed():
    """Two watchdogs on one rendezvous store, the peer's thread stopped after two beats (as a SIGSTOPped process
    would): rank 0 names rank 1 and where it was within peer_timeout + 2 heartbeats, and kills what it launched.
    """
    port = _free_port()
    master = dist.TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    failed = []
    zero = wd.Watchdog(0, 2, peer_timeout=1.0, heartbeat_s=0.2, store_address=("127.0.0.1", port),
                       launched=[child], exit_fn=failed.append)  # fmt: skip
    one = wd.Watchdog(1, 2, peer_timeout=1.0, heartbeat_s=0.2, store_address=("127.0.0.1", port), exit_fn=_raise)
    try:
        one.start()
        one.step = 7
        token = one.enter("generation")
        zero.start()
        time.sleep(0.6)
        one._stop.set()  # rank 1 stops answering
        started = time.monotonic()
        zero._thread.join(timeout=5)
        assert failed == [3] and time.monotonic() - started < 1.0 + 3 * 0.2
        assert re.fullmatch(r"rank 1 stopped answering: no heartbeat for \d+ s \(its last: generation at step 7\); "
                            r"rank 0, in training at step 0, stops too", zero.failure)  # fmt: skip
        assert child.wait(timeout=5) == -signal.SIGKILL
        one.leave(token)
    finally:
        zero.stop()
        one.stop()
        child.kill()
        del master


def _poisoned_sft(tmp_path, *extra):
    from conftest import run_qgen

    args = ["fit", "--config", os.path.join(CONFIGS, "sft.yaml"), "--trainer.max_steps=4",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.limit_val_batches=0",
            "--trainer.callbacks.init_args.every_n_train_steps=1", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=helpers_ddp.PoisonAtStep2", "--data.batch_size=2", *extra]  # fmt: skip
    return run_qgen(args, env={"PYTHONPATH": os.path.join(ROOT, "tests"), "QGEN_TEST_DUMP": str(tmp_path)})


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_at_its_step_and_the_last_good_checkpoint_is_kept(tmp_path):
    proc = _poisoned_sft(tmp_path, "--trainer.accumulate_grad_batches=2")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("qgen:")]
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines == ["qgen: error: step 2, micro-batch 0 (batch 4): the loss is nan on rank 0; stopped before its "
                     "backward pass, the weights are the last good step's"]  # fmt: skip
    ckpt = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2  # the last good step's, written before the poisoned one began
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


@pytest.mark.slow
def test_a_stopped_rank_ends_every_process_in_one_line_and_the_checkpoint_loads(tmp_path):
    """2 gloo processes started by Lightning's launcher (rank 1 is the child with LOCAL_RANK=1), collective
    timeout 20 s: rank 1 stops itself (SIGSTOP) after step 2. Within 20 + 60 s the launcher (rank 0) has exited
    non-zero with one line naming rank 1, no process of the run remains (the stopped one included), and
    last.ckpt loads.
    """
    args = [sys.executable, "-m", "qgen", "fit", "--config", os.path.join(CONFIGS, "sft.yaml"),
            "--config", os.path.join(CONFIGS, "strategy", "ddp.yaml"), "--trainer.strategy.init_args.timeout=0:00:20",
            "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_steps=50", "--data.batch_size=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.limit_val_batches=0",
            "--trainer.callbacks.init_args.every_n_train_steps=1", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=helpers_ddp.StopRankOne"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests"), "QGEN_TEST_DUMP": str(tmp_path),
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = tmp_path / "stopped_pid"
    try:
        deadline = time.monotonic() + 300
        while not stopped.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert stopped.exists(), "rank 1 never reached step 2"
        since = time.monotonic()
        _, err = proc.communicate(timeout=20 + 60 + 30)
        elapsed = time.monotonic() - since
    finally:
        if proc.poll() is None:
            proc.kill()
    pid = int(stopped.read_text())
    lines = [line for line in err.splitlines() if line.startswith("qgen:")]
    assert proc.returncode != 0 and elapsed < 20 + 60, (proc.returncode, elapsed, err[-3000:])
    pattern = (r"qgen: error: rank 1 stopped answering: no heartbeat for \d+ s \(its last: .* at step \d+\); "
               r"rank 0, in .* at step 2, stops too")
    assert len(lines) == 1 and re.match(pattern, lines[0]), err[-3000:]
    assert "Traceback" not in err
    time.sleep(1)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"  # rank 1 is gone
    print(f"the run ended {elapsed:.1f} s after rank 1 stopped: {lines[0]}")
    # rank 1 stopped before its step-2 checkpoint (ModelCheckpoint runs after the other callbacks), so rank 0 waits
    # in the save's collective: last.ckpt is step 1's, whole, or step 2's if rank 0 wrote it before waiting
    ckpt = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] in (1, 2) and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_optimizer_step(tmp_path):
    """At step 3 the loss is finite (0) but its gradient is not (sqrt at 0): the guard stops before the optimizer
    step, naming the step and micro-batch, and the weight is the one step 2 left.
    """
    import lightning as L

    from callbacks import FiniteGuard, NonFiniteError

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
            self.after: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                return (self.w - self.w.detach()).sqrt().sum()  # 0, with an infinite gradient
            return (self.w * batch).sum()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.after.append(self.w.detach().clone())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                        callbacks=[FiniteGuard()], default_root_dir=str(tmp_path))  # fmt: skip
    loader = torch.utils.data.DataLoader(torch.ones(20, 2), batch_size=1)
    with pytest.raises(NonFiniteError, match=r"^step 3, micro-batch 1 \(batch 7\): the gradient norm is (nan|inf) on "
                                             r"rank 0; stopped before the optimizer step"):  # fmt: skip
        trainer.fit(module, loader)
    assert torch.equal(module.w.detach(), module.after[5])  # as step 2 left it
    assert torch.allclose(module.w.detach(), torch.full((2,), 0.7))  # 3 steps of lr 0.1 x gradient 1


def test_the_engine_audit_counts_only_steps_after_a_push_and_needs_patience_in_a_row():
    from qgen.audit import EngineAudit, likely_cause

    audit = EngineAudit(threshold=1e-3, patience=2)
    verdicts = []
    for step, (gap, pushed) in enumerate([(5e-3, True), (1e-4, True), (5e-3, True), (9e-3, False), (2e-2, True)]):
        audit.add(gap * 100, 100.0)
        verdicts.append(audit.judge(step, pushed))
    # step 0 fails, step 1 resets; step 3 is stale by design (not audited); steps 2 and 4 fail in a row
    assert verdicts[:4] == [None, None, None, None]
    assert verdicts[4].startswith("policy/engine mismatch: the engine's log-probs differ from the trainer's by 0.02 "
                                  "per token (threshold 0.001) on the 2 steps right after weight pushes at steps 2, 4 "
                                  "(gaps 0.005, 0.02)")  # fmt: skip
    assert "weights not pushed" in verdicts[4]  # x4 from one audited step to the next
    assert likely_cause([2e-3, 3e-3], None, 1e-3).startswith("a precision mismatch")
    assert likely_cause([0.2, 0.3], 0.01, 1e-3).startswith("the engine samples the base weights")
    assert likely_cause([0.2, 0.3], 0.2, 1e-3).startswith("the engine holds other weights")
