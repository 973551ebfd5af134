"""Models whose final logits are not hidden x output weights are refused at load (qgen's losses would skip the step)."""

import pytest
import torch

from qgen.models import check_final_logits, load_causal_lm


def _tiny(tmp_path, cls_name, config_name, **extra):
    import transformers

    config = getattr(transformers, config_name)(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=1, head_dim=8, **extra)  # fmt: skip
    model = getattr(transformers, cls_name)(config)
    model.save_pretrained(tmp_path)
    return str(tmp_path)


def test_gemma2_soft_capping_is_refused_with_a_clear_message(tmp_path):
    path = _tiny(tmp_path, "Gemma2ForCausalLM", "Gemma2Config", final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        load_causal_lm(path)


def test_plain_qwen3_passes_and_an_output_bias_is_refused(tmp_path):
    path = _tiny(tmp_path, "Qwen3ForCausalLM", "Qwen3Config")
    model = load_causal_lm(path)  # no error
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    with pytest.raises(ValueError, match="output-layer bias"):
        check_final_logits(model)
