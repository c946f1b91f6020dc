#!/usr/bin/env python3
"""The PyTorch side of `scripts/bench-vs-torch.sh`: the same work as codespot's benchmarks, on
the same model (codespot's f32 HF export of the default model), in transformers, with the
same thread count. Prints one JSON object.

  --what taylor   forward + backward + Σ|θ·g| over every parameter, batch × seq-len synthetic
                  tokens (codespot's `synthetic_tokens`), median per-batch tokens/s
  --what adamw    forward + backward + torch.optim.AdamW step, median per-step tokens/s
  --what forward  no-grad forward of 1 × seq-len, median of 5, tokens/s
  --what generate greedy `generate` of --prompts synthetic prompts of --prompt-len tokens,
                  --new-tokens each, one prompt at a time; new tokens/s over the whole run

--autocast-bf16 runs the work under torch.autocast("cpu", dtype=torch.bfloat16): PyTorch's
own mixed precision (bf16 matmuls, f32 weights and sums), its fastest CPU configuration.

Peak RSS is the process's own (one --what per process). Multiple-choice evaluation is measured
with lm-evaluation-harness itself (scripts/bench-vs-torch.sh).
"""
import argparse
import json
import resource
import statistics
import time


def synthetic(vocab, rows, length, offset=0):
    return [[(i * 7919 + (b + offset) * 104729 + 17) % vocab for i in range(length)] for b in range(rows)]


def timed_batches(step, batches, tokens_per_batch):
    step(batches[0])  # warm-up
    rates = []
    for b in batches[1:]:
        t0 = time.perf_counter()
        step(b)
        rates.append(tokens_per_batch / (time.perf_counter() - t0))
    return statistics.median(rates), rates


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--what", required=True, choices=["taylor", "adamw", "forward", "generate"])
    ap.add_argument("--autocast-bf16", action="store_true")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()

    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    vocab = model.config.vocab_size
    out = {"what": a.what, "torch": torch.__version__, "threads": a.threads, "autocast_bf16": a.autocast_bf16}
    mixed = torch.autocast("cpu", dtype=torch.bfloat16) if a.autocast_bf16 else contextlib.nullcontext()
    with mixed:
        work(a, torch, model, vocab, out)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


def work(a, torch, model, vocab, out):
    """Run `a.what`, adding its measurements to `out`."""
    if a.what in ("taylor", "adamw"):
        model.train(False)  # no dropout either way; gradients still flow
        rows = synthetic(vocab, a.batch * (a.steps + 1), a.seq_len + 1)
        batches = [torch.tensor(rows[i : i + a.batch]) for i in range(0, len(rows), a.batch)]
        params = [p for p in model.parameters()]
        if a.what == "taylor":
            acc = [torch.zeros_like(p) for p in params]

            def step(x):
                # seq-len + 1 tokens in, labels shifted inside: seq-len predictions, as codespot's.
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                with torch.no_grad():
                    for s, p in zip(acc, params):
                        s.add_((p * p.grad).abs())
                        p.grad = None
        else:
            opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)

            def step(x):
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        med, rates = timed_batches(step, batches, a.batch * a.seq_len)
        out.update({"median_tokens_per_s": med, "batch_tokens_per_s": rates, "batch": a.batch, "seq_len": a.seq_len})
    elif a.what == "forward":
        x = torch.tensor(synthetic(vocab, 1, a.seq_len))
        with torch.no_grad():
            model(input_ids=x)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                model(input_ids=x)
                times.append(time.perf_counter() - t0)
        out["median_tokens_per_s"] = a.seq_len / statistics.median(times)
    elif a.what == "generate":
        prompts = synthetic(vocab, a.prompts, a.prompt_len)
        new = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for p in prompts:
                x = torch.tensor([p])
                y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=a.new_tokens,
                                   do_sample=False, pad_token_id=model.config.eos_token_id)
                new += y.shape[1] - x.shape[1]
        secs = time.perf_counter() - t0
        out.update({"median_tokens_per_s": new / secs, "new_tokens": new, "seconds": secs})


if __name__ == "__main__":
    main()
