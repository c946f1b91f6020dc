#!/usr/bin/env python3
"""Golden files for codespot's architecture parity test (tests/model_tiny.rs).

Builds tiny random models with transformers' own classes: Qwen2ForCausalLM (tied and untied
output embedding) and GemmaForCausalLM (tied, as Gemma always is); gives biases and norm
weights random values (transformers initialises them to 0 and 1 or 0, which would hide a
missing bias or a wrong norm form), saves each with
`save_pretrained` (config.json + model.safetensors, float32), then runs transformers' forward
and backward in float64 on those same float32 weights and writes, beside them, expected.safetensors:
  logits           [rows, len, vocab]   of TOKENS
  loss             [1]                  mean next-token cross-entropy of TOKENS
  grad.<name>      the loss's gradient for every parameter (HF names)

Usage: target/torch-venv/bin/python tools/reference_models.py tests/golden
Needs: torch, transformers (scripts/bench-vs-torch.sh makes target/torch-venv with both).
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import GemmaConfig, GemmaForCausalLM, Qwen2Config, Qwen2ForCausalLM

TOKENS = [[5, 9, 2, 40, 33, 7, 1, 60, 12, 3], [12, 3, 8, 8, 61, 4, 0, 19, 27, 50]]


# The shape every tiny model shares (head_dim 8).
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=1,
)


def qwen2(tied):
    return Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=tied, use_sliding_window=False))


def gemma(tied):
    assert tied
    # No padding index: nn.Embedding would withhold its row's input gradient, a training
    # detail of transformers' that codespot's loss (padding flagged out of the loss) lacks.
    return GemmaForCausalLM(GemmaConfig(**TINY, head_dim=8, hidden_act="gelu_pytorch_tanh", pad_token_id=None))


def build(out, make, tied, seed):
    torch.manual_seed(seed)
    m = make(tied).float()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
            elif "norm" in name:
                # Gemma scales by 1 + w (stored near 0), the others by w (near 1).
                p.uniform_(-0.1, 0.1) if isinstance(m, GemmaForCausalLM) else p.uniform_(0.9, 1.1)
            else:
                p.normal_(0.0, 0.2)
    os.makedirs(out, exist_ok=True)
    m.save_pretrained(out, safe_serialization=True)
    m = m.double()
    ids = torch.tensor(TOKENS)
    logits = m(input_ids=ids).logits
    # The loss in float64 here: transformers' own loss casts the logits to float32.
    v = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    loss.backward()
    expected = {"logits": logits.detach().contiguous(), "loss": loss.detach().reshape(1)}
    for name, p in m.named_parameters():
        expected["grad." + name] = p.grad.detach().contiguous()
    save_file(expected, os.path.join(out, "expected.safetensors"))
    print(out, "loss", float(loss), "params", sum(p.numel() for p in m.parameters()))


if __name__ == "__main__":
    root = sys.argv[1]
    build(os.path.join(root, "qwen2_tiny_tied"), qwen2, True, 1)
    build(os.path.join(root, "qwen2_tiny_untied"), qwen2, False, 2)
    build(os.path.join(root, "gemma_tiny"), gemma, True, 3)
