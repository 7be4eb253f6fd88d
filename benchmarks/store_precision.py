"""What bf16 / fp8 / int8 token caches cost in accuracy against fp16: the same images, backbone and probes.

Run by hand (no network, no weights needed):

    .venv/bin/python benchmarks/store_precision.py [--model timm:vit_tiny_patch16_224] [--json out.json]

scikit-learn's 1,797 handwritten digits as an image folder (benchmarks/small_real_data.py: 1,198 train /
599 test, upsampled; timm's transform resizes them to 224 px), extracted once per store (`--store
fp16`, `bf16`, `fp8`, `int8`; random-init weights seeded 0, fp32 compute on CPU), then probed from each
cache with the same commands and seeds:

    vitprobe probe --protocol logreg --pool cls --pool mean          (L-BFGS logistic regression)
    vitprobe probe --pool abmilp --epochs 10 --min-steps 0 --lr-grid 0.01,0.1,1

It prints, per store: bytes per image, the relative RMS error of the stored tokens against the fp16 cache's,
and the test top-1 of each read-out (and its difference to fp16, in points).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STORES = ("fp16", "bf16", "fp8", "int8")
PROBES = {
    "logreg": ["--protocol", "logreg", "--pool", "cls", "--pool", "mean"],
    "abmilp": ["--pool", "abmilp", "--epochs", "10", "--min-steps", "0", "--lr-grid", "0.01,0.1,1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:vit_tiny_patch16_224")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from small_real_data import digits

    from vitprobe.cache import open_cache
    from vitprobe.extract import ExtractConfig, extract

    report: dict = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                    "stores": {}}
    with tempfile.TemporaryDirectory(prefix="vitprobe-precision-") as tmp:
        root = Path(tmp) / "digits"
        digits(root)
        caches: dict[str, dict[str, Path]] = {}
        for store in STORES:
            caches[store] = {}
            for split in ("train", "test"):
                out = Path(tmp) / f"{store}-{split}"
                extract(ExtractConfig(model=args.model, data=f"imagefolder:{root}", split=split, out=out,
                                      random_init=True, workers=args.workers, store=store, batch_size=64))
                caches[store][split] = out
        reference = open_cache(caches["fp16"]["test"])
        for store in STORES:
            cache = open_cache(caches[store]["test"])
            num = den = 0.0
            for a, b in zip(reference.iter_shards(["patches", "cls"]), cache.iter_shards(["patches", "cls"]),
                            strict=True):
                for key in ("patches", "cls"):
                    x, y = a[key].float(), b[key].float()
                    num += float(((y - x) ** 2).sum())
                    den += float((x**2).sum())
            entry = {"bytes_per_image": cache.manifest["bytes_per_sample"],
                     "token_rel_rms_vs_fp16": (num / den) ** 0.5, "top1": {}}
            for name, options in PROBES.items():
                run = Path(tmp) / f"run-{store}-{name}"
                command = [sys.executable, "-m", "vitprobe", "probe", "--train", str(caches[store]["train"]),
                           "--test", str(caches[store]["test"]), "--out", str(run), *options]
                subprocess.run(command, check=True, capture_output=True, text=True)
                results = json.loads((run / "results.json").read_text())
                for pool, readout in results["readouts"].items():
                    entry["top1"][f"{pool} ({name})"] = readout["top1"]
            report["stores"][store] = entry
    base = report["stores"]["fp16"]
    for store, entry in report["stores"].items():
        deltas = {k: 100 * (v - base["top1"][k]) for k, v in entry["top1"].items()}
        entry["top1_delta_points_vs_fp16"] = deltas
        tops = ", ".join(f"{k} {100 * v:.1f} % ({deltas[k]:+.1f})" for k, v in entry["top1"].items())
        print(f"{store:5s} {entry['bytes_per_image']:7d} B/image  token rel. RMS vs fp16 "
              f"{entry['token_rel_rms_vs_fp16']:.4f}  top-1: {tops}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
