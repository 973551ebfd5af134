"""Random-init models of a real architecture (``random:<arch>``, qgen.random_init) and qgen's own NF4 layers
(qgen.fourbit): the folder, the tokenizer sized to the vocabulary, reproducible weights, in-memory quantization."""

import json

import pytest
import torch

from qgen.models import LoraSpec, load_causal_lm, load_tokenizer, resolve
from qgen.plan import load_arch

TINY = {"model_type": "qwen3", "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "tie_word_embeddings": True, "max_position_embeddings": 2048}  # fmt: skip


@pytest.fixture
def tiny_arch(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(TINY))
    return f"random:{path}"


def test_a_bundled_architecture_gets_its_full_vocabulary_and_every_id_decodes():
    tok = load_tokenizer("random:Qwen3-14B")
    assert len(tok) == 151936 == load_arch("random:Qwen3-14B").vocab
    embedded = load_tokenizer(None)
    text = "已知函数 f(x)=x^2，求 f(3) 的值。"
    assert tok(text).input_ids == embedded(text).input_ids  # the bundled data encodes as before
    assert all(tok.decode([i]) for i in (len(embedded), 100_000, 151_935))  # filler ids decode to text
    config = json.loads(open(f"{resolve('random:Qwen3-14B')}/config.json").read())
    assert (config["hidden_size"], config["num_hidden_layers"], config["eos_token_id"]) == (5120, 40, tok.eos_token_id)


def test_unknown_architectures_and_too_small_vocabularies_are_named(tmp_path):
    with pytest.raises(ValueError, match="no bundled architecture of that name .*Qwen3-14B"):
        resolve("random:Qwen3-15B")
    small = tmp_path / "small.json"
    small.write_text(json.dumps({**TINY, "vocab_size": 100}))
    with pytest.raises(ValueError, match=r"small.json: vocab_size must be an integer of at least \d+"):
        resolve(f"random:{small}")


def test_weights_are_drawn_the_same_in_every_process_norms_one_and_ties_kept(tiny_arch):
    one = load_causal_lm(tiny_arch, None, None, "float32")
    two = load_causal_lm(tiny_arch, None, None, "float32")
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values()))
    assert one.lm_head.weight is one.model.embed_tokens.weight
    q = one.model.layers[0].self_attn.q_proj.weight
    assert abs(q.std().item() - 0.02) < 0.002 and torch.equal(one.model.norm.weight, torch.ones(128))
    # rotary frequencies computed for real, not left on the meta device
    assert torch.allclose(one.model.rotary_emb.inv_freq, 1.0 / one.config.rope_parameters["rope_theta"] **
                          (torch.arange(0, 32, 2).float() / 32))  # fmt: skip


def test_nf4_random_model_is_quantized_in_memory_and_trains_a_lora_adapter(tiny_arch):
    import bitsandbytes as bnb

    full = load_causal_lm(tiny_arch, None, None, "float32")
    model = load_causal_lm(tiny_arch, LoraSpec(r=4, dropout=0.0), "nf4", "float32")
    base = model.get_base_model()
    layer = base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit) and base.is_loaded_in_4bit
    assert base.config.quantization_config.bnb_4bit_quant_type == "nf4"
    # the 4-bit weight is the drawn weight, quantized: NF4's error on N(0, 0.02) weights is a few percent
    restored = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    drawn = full.model.layers[0].self_attn.q_proj.weight
    assert (restored - drawn).abs().mean() < 0.1 * drawn.abs().mean()
    ids = torch.tensor([[5, 6, 7, 8]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
