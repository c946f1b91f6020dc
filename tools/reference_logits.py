#!/usr/bin/env python3
"""Independent reference for codespot's logits-parity test.

Reads the GGUF with llama.cpp's own `gguf` Python package (its dequantizer, not ours),
un-permutes the Q/K rows that llama.cpp's converter permuted for interleaved RoPE,
runs the HF Llama forward pass in float64 numpy, and writes the last-token logits of a
fixed prompt to tests/golden/. The prompt's token ids come from a byte-level BPE built with
the Python `tokenizers` package from the GGUF's vocabulary and merges.

Usage: python tools/reference_logits.py MODEL.gguf OUT.json
Needs: pip install gguf numpy tokenizers
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

PROMPT = "<|im_start|>user\ndef fibonacci(n):\n    return 42<|im_end|>\n<|im_start|>assistant\n"


def field(r, key):
    return r.fields[key].contents()


def tokenize(r, text):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, AddedToken

    toks = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(r, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(toks)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(toks[i], special=True) for i, t in enumerate(types) if t == 3])
    return tok.encode(text).ids


def main():
    path, out = sys.argv[1], sys.argv[2]
    r = GGUFReader(path)
    n_layer = int(field(r, "llama.block_count"))
    n_head = int(field(r, "llama.attention.head_count"))
    n_kv = int(field(r, "llama.attention.head_count_kv"))
    d = int(field(r, "llama.embedding_length"))
    eps = float(field(r, "llama.attention.layer_norm_rms_epsilon"))
    base = float(field(r, "llama.rope.freq_base"))
    hd = d // n_head
    W = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
        [int(x) for x in reversed(t.shape)]) for t in r.tensors}

    def unpermute(w, heads):
        # llama.cpp's converter: w.reshape(heads, 2, hd/2, in).swapaxes(1, 2)
        return w.reshape(heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)

    ids = tokenize(r, PROMPT)
    T = len(ids)
    emb = W["token_embd.weight"]
    x = emb[ids]

    def rms(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    inv = 1.0 / base ** (np.arange(0, hd, 2) / hd)
    ang = np.outer(np.arange(T), inv)
    cos = np.concatenate([np.cos(ang)] * 2, -1)
    sin = np.concatenate([np.sin(ang)] * 2, -1)

    def rope(q):  # q: [h, T, hd], HF rotate-half
        q1, q2 = q[..., : hd // 2], q[..., hd // 2:]
        return q * cos + np.concatenate([-q2, q1], -1) * sin

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(n_layer):
        p = f"blk.{l}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = h @ unpermute(W[p + "attn_q.weight"], n_head).T
        k = h @ unpermute(W[p + "attn_k.weight"], n_kv).T
        v = h @ W[p + "attn_v.weight"].T
        q = rope(q.reshape(T, n_head, hd).transpose(1, 0, 2))
        k = rope(k.reshape(T, n_kv, hd).transpose(1, 0, 2))
        v = v.reshape(T, n_kv, hd).transpose(1, 0, 2)
        rep = n_head // n_kv
        k = np.repeat(k, rep, 0)
        v = np.repeat(v, rep, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(T, d)
        x = x + a @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        g = h @ W[p + "ffn_gate.weight"].T
        u = h @ W[p + "ffn_up.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ W[p + "ffn_down.weight"].T
    x = rms(x, W["output_norm.weight"])
    head = W.get("output.weight", emb)
    logits = x[-1] @ head.T
    top = np.argsort(-logits)[:10]
    json.dump({"prompt": PROMPT, "token_ids": [int(i) for i in ids],
               "logits": [float(v) for v in logits],
               "top10": [int(i) for i in top],
               "produced_by": "tools/reference_logits.py (gguf dequantize + float64 numpy)"},
              open(out, "w"))
    print("tokens", ids)
    print("top10", top, logits[top])


if __name__ == "__main__":
    main()
