"""Benchmark: FID feature extraction and total FID time, histolab vs torch-fidelity 0.4.0, same weights, same run.

Both use the same InceptionV3 weights (default_1.pt, converted by histolab and
handed to torch-fidelity in its own layout), the same images (bundled 64 px
crops), the same batch size and the same device. Each side resizes the way it
documents: histolab with PIL bicubic on float channels (clean-fid), torch-
fidelity with its TF1-compatible bilinear interpolation; so the two FIDs
differ slightly and both are printed. Rounds alternate between the two to
share any background load fairly; the best round of each is reported.

    python bench/evaluation.py [--n 32] [--rounds 2] [--batch-size 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout: python bench/evaluation.py

import numpy as np
import torch

import histolab  # noqa: F401  (torchvision shim first)
from histolab.evaluation import metrics
from histolab.evaluation.extractors import InceptionExtractor
from histolab.evaluation.features import ALL, collect
from histolab.evaluation.images import open_image_set
from histolab.evaluation.torch_fidelity_compat import torch_fidelity_extractor, torch_fidelity_state


class _Uint8Set(torch.utils.data.Dataset):
    """The same images as uint8 CHW tensors, the input torch-fidelity takes."""

    def __init__(self, image_set):
        self.images = [
            torch.from_numpy(np.asarray(image_set.load(i))).permute(2, 0, 1).contiguous() for i in range(len(image_set))
        ]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="images per set")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per side (best is reported)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per forward pass, both sides")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    import torch_fidelity

    real = open_image_set("bundled:test", max_images=args.n)
    fake = open_image_set("bundled:train", max_images=args.n)
    ours = InceptionExtractor(device=args.device)
    tmp = tempfile.mkdtemp(prefix="bench-eval-")
    theirs = torch_fidelity_extractor(ours.model.cpu(), tmp).to(args.device).eval()
    ours.model.to(args.device)
    weights_path = f"{tmp}/tf_layout.pth"
    torch.save(torch_fidelity_state(ours.model.cpu()), weights_path)
    ours.model.to(args.device)
    real_u8, fake_u8 = _Uint8Set(real), _Uint8Set(fake)
    pil_real = [real.load(i) for i in range(len(real))]
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, {args.n} images per set of 64 px crops, batch {args.batch_size}"
    )

    def ours_extract():
        for s in range(0, len(pil_real), args.batch_size):
            ours.features(pil_real[s : s + args.batch_size])

    def theirs_extract():
        with torch.no_grad():
            for s in range(0, len(real_u8), args.batch_size):
                theirs(torch.stack(real_u8.images[s : s + args.batch_size]).to(args.device))

    def ours_fid():
        f = (
            collect([ours], real, batch_size=args.batch_size)["inception"],
            collect([ours], fake, batch_size=args.batch_size)["inception"],
        )
        a, b = f[0].stats[ALL], f[1].stats[ALL]
        return metrics.frechet_distance(a.mean, a.cov, b.mean, b.cov)

    def theirs_fid():
        out = torch_fidelity.calculate_metrics(
            input1=fake_u8,
            input2=real_u8,
            fid=True,
            feature_extractor="inception-v3-compat",
            feature_extractor_weights_path=weights_path,
            batch_size=args.batch_size,
            cuda=args.device.startswith("cuda"),
            cache=False,
            verbose=False,
        )
        return out["frechet_inception_distance"]

    # Warm-up: one batch each (first-call allocations, oneDNN kernel choice).
    ours.features(pil_real[: args.batch_size])
    with torch.no_grad():
        theirs(torch.stack(real_u8.images[: args.batch_size]).to(args.device))

    times = {"ours_extract": [], "theirs_extract": [], "ours_fid": [], "theirs_fid": []}
    fids = {}
    for r in range(args.rounds):
        for key, fn in (("ours_extract", ours_extract), ("theirs_extract", theirs_extract)):
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
        for key, fn in (("ours_fid", ours_fid), ("theirs_fid", theirs_fid)):
            t = time.perf_counter()
            fids[key] = fn()
            times[key].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)

    best = {k: min(v) for k, v in times.items()}
    ips_ours, ips_theirs = args.n / best["ours_extract"], args.n / best["theirs_extract"]
    print(
        f"feature extraction: histolab {ips_ours:.2f} images/s, torch-fidelity {ips_theirs:.2f} images/s, ratio {ips_ours / ips_theirs:.2f}x"
    )
    print(
        f"total FID ({args.n} vs {args.n} images): histolab {best['ours_fid']:.2f} s, torch-fidelity {best['theirs_fid']:.2f} s, "
        f"ratio (torch-fidelity time / histolab time) {best['theirs_fid'] / best['ours_fid']:.2f}x"
    )
    print(
        f"FID values: histolab {fids['ours_fid']:.4f} (PIL bicubic resize), torch-fidelity {fids['theirs_fid']:.4f} (TF bilinear resize)"
    )


if __name__ == "__main__":
    main()
