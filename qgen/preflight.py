"""Before ``fit`` reads any model file: will the run fit in memory, and are the model's files there?

1. **Memory pre-flight** (:func:`preflight`): the run is planned with :mod:`qgen.plan` (the code of ``qgen plan``)
   for its own config, strategy and world size, and the per-device peak is compared with what the device has
   free: CUDA, the free memory of the device this process will use; CPU, the host's available memory shared by
   the ranks that run on it. A plan above ``MARGIN`` (90%) of the free memory stops the run in one line that
   names the planned peak, the free memory, the largest term and the first change, among those tried in
   :func:`suggestions`, that the planner has checked would fit. ``--preflight warn`` prints the line and goes
   on, ``--preflight off`` skips the check. Only the architecture is needed: the files qgen bundles
   (``qgen/arch``), a local folder's ``config.json`` or the hub's cached ``config.json``; a model known by none of
   them is not planned (one warning) and the run goes on.
2. **Model files** (:func:`check_model_files`): a hub model that is neither cached nor reachable stops the run in
   one line that names it and the cache folder looked in, not in a ``transformers`` traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

from qgen.plan import GB, Arch, PlanError, Workload, load_arch, plan, workload_from_config
from qgen.strategies.checks import strategy_kind

MARGIN = 0.9  # the planned peak may take at most this share of the free memory
MODES = ("refuse", "warn", "off")
COLUMN = {"fsdp1": "fsdp-qlora", "fsdp2": "fsdp2-lora"}  # the planner's column for qgen's sharded strategies


class PreflightError(RuntimeError):
    """The run would not fit (or its model is nowhere to be found): the message is the one line to print."""


@functools.lru_cache(maxsize=16)  # asked by the plan and then by the model check: one hub round trip
def _hub_config(name: str, download: bool) -> str | None:
    """The path of a hub model's ``config.json``: cached, else (``download``) fetched; ``None`` if neither."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:  # pragma: no cover - a transformers dependency
        return None
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return cached
    if not download or _offline():
        return None
    import logging

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retries would print a line each; the caller prints one
    try:
        return hf_hub_download(name, "config.json", etag_timeout=10)
    except Exception:  # noqa: BLE001 - any failure means "not reachable"; the model check says more
        return None
    finally:
        hub_log.setLevel(level)


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in flags)


def _is_hub_id(name: Any) -> bool:
    return isinstance(name, str) and not name.startswith(("embedded", "random:")) and not name.endswith(".ckpt") and \
        name != "last" and not os.path.exists(name)  # fmt: skip


def arch_of(name: str | None) -> Arch:
    """The architecture of a model name: bundled file, local folder, embedded preset, or the hub's ``config.json``
    (cached, or fetched when the hub is reachable). :class:`PlanError` when none has it.
    """
    try:
        return load_arch(name)
    except PlanError:
        path = _hub_config(name, download=True) if _is_hub_id(name) else None
        if path is None:
            raise
        return load_arch(os.path.dirname(path))


# ------------------------------------------------------------------------------------------------ memory
def _devices(trainer: dict) -> tuple[str, int, int]:
    """``(accelerator, devices on this node, nodes)`` of the trainer settings."""
    import torch

    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    accelerator = "cuda" if accelerator == "gpu" else accelerator
    devices = trainer.get("devices", "auto")
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        count = int(devices)
    elif isinstance(devices, int):
        count = devices
    else:
        count = -1
    if count < 0:
        count = torch.cuda.device_count() if accelerator == "cuda" else 1
    return accelerator, max(count, 1), max(int(trainer.get("num_nodes") or 1), 1)


def available_host_memory() -> float:
    """Bytes of host memory available to new allocations (``MemAvailable``; psutil elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return float(psutil.virtual_memory().available)


def free_device_memory(accelerator: str, devices: int) -> tuple[float, str]:
    """``(bytes free for one rank, where that figure comes from)``."""
    if accelerator == "cuda":
        import torch

        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        free, _ = torch.cuda.mem_get_info(local)  # the device this process uses anyway
        return float(free), f"free on cuda:{local}"
    host = available_host_memory()
    if devices > 1:
        return host / devices, f"available host memory / {devices} ranks"
    return host, "available host memory"


@dataclass
class Verdict:
    planned: float  # bytes per device
    free: float
    where: str  # what ``free`` is
    largest: tuple[str, float]
    column: str
    devices: int
    fix: str | None  # a change the planner checked would fit (None: it fits, or nothing tried fits)

    @property
    def fits(self) -> bool:
        return self.planned <= MARGIN * self.free

    def line(self) -> str:
        head = (f"the run plans {self.planned / GB:.1f} GB per device ({self.column}, {self.devices} device(s); "
                f"largest term: {self.largest[0]} {self.largest[1] / GB:.1f} GB) but {self.free / GB:.1f} GB is "
                f"{self.where} (at most {MARGIN:.0%} of it may be planned)")  # fmt: skip
        fix = f"; {self.fix}" if self.fix else "; no single change tried fits (see `qgen plan`)"
        return head + fix + ". --preflight warn starts anyway, --preflight off skips this check"


def _total(w: Workload, column: str, gpus: int, device_memory: float) -> float:
    table = plan(w, gpus, device_memory)
    return table[column]["total"] if column in table else float("inf")


def suggestions(w: Workload, column: str, gpus: int, accelerator: str) -> list[tuple[str, Workload, str, int]]:
    """Changes to try, in order of how little they change the run: ``(flags, workload, column, devices)``."""
    out = []
    if not w.checkpointing:
        out.append(("--model.init_args.gradient_checkpointing=true", replace(w, checkpointing=True), column, gpus))
    base = replace(w, checkpointing=True)
    if w.stage == "grpo":
        calls = w.generation_batch or w.batch * w.accumulate
        n = calls // 2
        while n >= 1:
            flag = f"--model.init_args.generation_batch_size={n}"
            out.append((flag, replace(base, generation_batch=n), column, gpus))
            n //= 2
    b, a = w.batch // 2, w.accumulate * 2
    while b >= 1:
        out.append((f"--data.batch_size={b} --trainer.accumulate_grad_batches={a} (same effective batch)",
                    replace(base, batch=b, accumulate=a), column, gpus))  # fmt: skip
        b, a = b // 2, a * 2
    if w.lora_r and w.quantization is None:
        out.append(("--model.init_args.quantization=nf4", replace(base, quantization="nf4"), column, gpus))
    if w.lora_r and accelerator == "cuda":  # sharding over more GPUs (on the CPU the ranks share one host)
        for n in (2, 4, 8):
            if n > gpus:
                out.append((f"--config configs/strategy/fsdp-qlora.yaml --trainer.devices={n} (fsdp-qlora on {n} GPUs)",
                            base, "fsdp-qlora", n))  # fmt: skip
    return out


def preflight(config: dict, prompt_tokens: int = 256) -> Verdict:
    """The memory verdict for a merged ``fit`` config (:class:`PlanError` when its model's architecture is
    unknown).
    """
    trainer = config.get("trainer") or {}
    kind = strategy_kind(trainer.get("strategy"))
    column = COLUMN.get(kind, "ddp")
    w = workload_from_config(config, prompt_tokens, arch_of=arch_of)
    accelerator, devices, nodes = _devices(trainer)
    if accelerator != "cuda" and w.engine == "vllm":  # vLLM on the CPU: a KV cache of kv_cache_gib, not a share
        vllm = ((config.get("model") or {}).get("init_args") or {}).get("vllm") or {}
        w = replace(w, engine_kv_bytes=float(vllm.get("kv_cache_gib", 2)) * 2**30)
    gpus = devices * nodes
    free, where = free_device_memory(accelerator, devices)
    memory = free if accelerator == "cuda" else 80 * GB  # the vLLM engine's share is of the GPU's memory
    table = plan(w, gpus, memory)
    if column not in table:
        column = "ddp"
    rows = {k: v for k, v in table[column].items() if k != "total"}
    verdict = Verdict(table[column]["total"], free, where, max(rows.items(), key=lambda kv: kv[1]), column, gpus, None)
    if not verdict.fits:
        for flags, candidate, col, n in suggestions(w, column, gpus, accelerator):
            total = _total(candidate, col, n, memory)
            if total <= MARGIN * free:
                verdict.fix = f"{flags} plans {total / GB:.1f} GB"
                break
    return verdict


def run_preflight(config: dict, mode: str) -> Verdict | None:
    """The pre-flight of ``fit`` (see the module docstring): raises :class:`PreflightError` in ``refuse`` mode."""
    if mode == "off":
        return None
    try:
        verdict = preflight(config)
    except PlanError as err:
        print(f"qgen: warning: memory pre-flight skipped: {err}", file=sys.stderr)
        return None
    if not verdict.fits:
        if mode == "refuse":
            raise PreflightError(f"out of memory before it starts: {verdict.line()}")
        print(f"qgen: warning: {verdict.line()}", file=sys.stderr)
    return verdict


# ------------------------------------------------------------------------------------------- model files
def check_model_files(*names: Any) -> None:
    """Each hub model among ``names`` is cached or reachable, else one :class:`PreflightError` line."""
    for name in names:
        if not _is_hub_id(name):
            continue
        if _hub_config(name, download=True) is not None:
            continue
        from huggingface_hub.constants import HF_HUB_CACHE

        why = "the hub is switched off (HF_HUB_OFFLINE)" if _offline() else \
            "the hub did not answer or has no such model"  # fmt: skip
        raise PreflightError(f"model {name}: not in the Hugging Face cache ({HF_HUB_CACHE}) and {why}; download it "
                             "where the hub is reachable, or set model_name_or_path to a local folder")  # fmt: skip
