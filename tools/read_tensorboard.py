"""Read a TensorBoard log dir with TensorBoard's own EventAccumulator (not codespot's writer)
and print every tag as JSON: {"scalars": {tag: [[step, value], ...]},
"histograms": {tag: [[step, num], ...]}, "images": {tag: [[step, width, height, png_bytes], ...]}}.
Used by tests/tune.rs; the venv with `tensorboard` is made by scripts/setup.sh."""
import json
import sys

from tensorboard.backend.event_processing import event_accumulator as ea

acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0})
acc.Reload()
tags = acc.Tags()
out = {
    "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
    "histograms": {t: [[e.step, e.histogram_value.num] for e in acc.Histograms(t)] for t in tags["histograms"]},
    "images": {
        t: [[e.step, e.width, e.height, len(e.encoded_image_string)] for e in acc.Images(t)] for t in tags["images"]
    },
}
# A PNG must start with its signature.
for t in tags["images"]:
    for e in acc.Images(t):
        assert e.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n", t
json.dump(out, sys.stdout)
