#!/usr/bin/env python3
"""The PyTorch side of `scripts/bench-vs-torch.sh`: the same work as codespot's benchmarks, on
the same model (codespot's f32 HF export of the default model), in transformers, with the
same thread count. Prints one JSON object.

  --what taylor   forward + backward + Σ|θ·g| over every parameter, batch × seq-len synthetic
                  tokens (codespot's `synthetic_tokens`), median per-batch tokens/s
  --what adamw    forward + backward + torch.optim.AdamW step, median per-step tokens/s
  --what forward  no-grad forward of 1 × seq-len, median of 5, tokens/s
  --what mc       ARC-Easy validation, every item, log-likelihood of each choice batched as
                  lm-evaluation-harness does (sorted by length, batch 8, right-padded), acc and
                  acc_norm; wall seconds

Peak RSS is the process's own (one --what per process).
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


def arc_items(arrow_path):
    import pyarrow as pa

    with pa.memory_map(arrow_path) as src:
        try:
            table = pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(src).read_all()
    items = []
    for r in table.to_pylist():
        ctx = f"Question: {r['question']}\nAnswer:"
        labels = r["choices"]["label"]
        label = labels.index(r["answerKey"]) if r["answerKey"] in labels else 0
        items.append(([(ctx, f" {t}") for t in r["choices"]["text"]], label))
    return items


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--what", required=True, choices=["taylor", "adamw", "forward", "mc"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--arc")
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(a.threads)
    model = LlamaForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    vocab = model.config.vocab_size
    out = {"what": a.what, "torch": torch.__version__, "threads": a.threads}

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
    else:
        tok = AutoTokenizer.from_pretrained(a.model)
        items = arc_items(a.arc)
        t0 = time.perf_counter()
        reqs = []
        for i, (opts, _) in enumerate(items):
            for j, (ctx, cont) in enumerate(opts):
                c = tok.encode(ctx, add_special_tokens=False)
                k = tok.encode(cont, add_special_tokens=False)
                reqs.append((i, j, c + k[:-1], len(c) - 1, k))
        reqs.sort(key=lambda r: -len(r[2]))
        ll = {}
        with torch.no_grad():
            for s in range(0, len(reqs), 8):
                chunk = reqs[s : s + 8]
                t = len(chunk[0][2])
                x = torch.tensor([r[2] + [0] * (t - len(r[2])) for r in chunk])
                logp = torch.log_softmax(model(input_ids=x).logits.float(), dim=-1)
                for row, (i, j, _, first, k) in enumerate(chunk):
                    pos = torch.arange(first, first + len(k))
                    ll[(i, j)] = logp[row, pos, torch.tensor(k)].sum().item()
        acc = accn = 0
        for i, (opts, label) in enumerate(items):
            s = [ll[(i, j)] for j in range(len(opts))]
            n = [ll[(i, j)] / max(len(opts[j][1]), 1) for j in range(len(opts))]
            acc += max(range(len(s)), key=s.__getitem__) == label
            accn += max(range(len(n)), key=n.__getitem__) == label
        out.update({"seconds": time.perf_counter() - t0, "items": len(items), "acc": acc / len(items), "acc_norm": accn / len(items)})
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
