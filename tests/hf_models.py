"""Random small transformers GPT-NeoX models: the reference the parity tests compare against."""

import torch


def random_gpt_neox(seed: int, *, head_scale: float = 1.0, **config):
    """A seeded GPTNeoXForCausalLM (eager attention, float32, eval) with non-trivial biases and norms.

    `config` overrides the GPTNeoXConfig defaults below; `head_scale` multiplies the output layer
    (sharper distributions make greedy continuations and multiple-choice answers decisive).
    """
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    fields = dict(vocab_size=1003, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=160, max_position_embeddings=64, layer_norm_eps=1e-5,
                  attention_dropout=0.0, hidden_dropout=0.0, tie_word_embeddings=False)
    fields.update(config)
    hf_config = GPTNeoXConfig(**fields)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(hf_config).float().eval()
    with torch.no_grad():  # every term of the block is exercised, not just the matmuls
        for name, p in model.named_parameters():
            if "bias" in name or "layernorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if head_scale != 1.0 and ("embed_out" in name or "lm_head" in name):
                p.mul_(head_scale)
    return model
