"""``python -m histolab evaluate``: FID/KID/precision/recall/IS/Vendi of generated images against real ones."""

from __future__ import annotations

import sys
import time
from pathlib import Path

NAME = "evaluate"
HELP = "Measure generated images against real ones (FID, KID, precision/recall, IS, Vendi, memorisation)."


def add_arguments(p) -> None:
    p.add_argument(
        "--real",
        required=True,
        help="real (held-out) images: a folder (class = first subfolder), FILE.csv[@SPLIT] (path,label[,split]) "
        "or bundled:train|val|test (150 crops per class, stride 8, seed 0)",
    )
    p.add_argument(
        "--fake", required=True, help="generated images, same forms as --real (fake/<class>/*.png for classes)"
    )
    p.add_argument(
        "--train",
        default=None,
        help="the generator's training images, same forms; when given, each generated image's nearest training "
        "image is found and near-copies are flagged (memorisation)",
    )
    p.add_argument("--per-class", action="store_true", help="also compute every metric per class")
    p.add_argument(
        "--features",
        default="inception",
        help="comma-separated feature spaces: inception (FID network), uni2h, uni, embedded (default: inception)",
    )
    p.add_argument("--json", default=None, help="write the JSON report here (default: OUT/evaluation.json)")
    p.add_argument(
        "--out",
        default=None,
        help="folder for the JSON, CSV and PNG figures (default: beside --fake as <fake>-evaluation, "
        "or outputs/evaluation/<time> for bundled sets)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (results do not depend on it)")
    p.add_argument("--kid-subsets", type=int, default=100, help="number of KID subsets (default 100)")
    p.add_argument(
        "--kid-subset-size", type=int, default=1000, help="KID subset size, cut to the smaller set (default 1000)"
    )
    p.add_argument("--pr-k", type=int, default=3, help="k of the k-NN manifolds for precision/recall (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the KID subsets (default 0)")
    p.add_argument(
        "--inception-head",
        default=None,
        help="a file with the Inception 1008-class softmax weights (torch-fidelity's weights-inception-2015-12-05-"
        "6726825d.pth or pytorch-fid's pt_inception-2015-12-05-6726825d.pth) to compute the Inception Score",
    )
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images per set (evenly spaced)")
    p.add_argument("--device", default="cpu", help="torch device for feature extraction (cpu, cuda, ...)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument(
        "--cache",
        default=None,
        help="keep extracted features in this folder and reuse them when the same images are evaluated again "
        "in the same feature space (keyed by the images' pixels and the weights)",
    )


def default_out_dir(fake_spec: str) -> Path:
    p = Path(fake_spec)
    if not fake_spec.startswith("bundled:") and p.is_dir():
        return p.resolve().parent / f"{p.resolve().name}-evaluation"
    from histolab.config import Paths

    return Paths.from_env().outputs / "evaluation" / time.strftime("%Y%m%d-%H%M%S")


def run(args) -> int:
    from histolab.errors import InvalidRequest
    from histolab.evaluation.evaluate import EvalConfig
    from histolab.evaluation.extractors import get_extractor, parse_feature_names
    from histolab.evaluation.images import open_image_set
    from histolab.evaluation.report import (
        metric_rows,
        plot_nn_pairs,
        plot_per_class_kid,
        summary_lines,
        write_csv,
        write_json,
    )
    from histolab.evaluation.runner import evaluate_sets

    if args.max_images is not None and args.max_images < 2:
        raise InvalidRequest(f"--max-images must be at least 2, got {args.max_images}")
    config = EvalConfig(
        per_class=args.per_class,
        batch_size=args.batch_size,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        pr_k=args.pr_k,
        seed=args.seed,
    ).validate()
    names = parse_feature_names(args.features)
    real = open_image_set(args.real, max_images=args.max_images)
    fake = open_image_set(args.fake, max_images=args.max_images)
    train = open_image_set(args.train, max_images=args.max_images) if args.train else None
    extractors = [get_extractor(n, device=args.device, logits_head=args.inception_head) for n in names]
    print(f"real: {real.spec} ({len(real)} images)  fake: {fake.spec} ({len(fake)} images)", file=sys.stderr)

    def progress(role: str, done: int, total: int) -> None:
        print(f"\r{role}: {done}/{total} images", end="" if done < total else "\n", file=sys.stderr, flush=True)

    report = evaluate_sets(
        real,
        fake,
        extractors,
        config,
        train=train,
        progress=progress,
        warn=lambda m: print(m, file=sys.stderr),
        feature_cache=args.cache,
    )
    out = Path(args.out) if args.out else default_out_dir(args.fake)
    json_path = write_json(report, args.json or out / "evaluation.json")
    csv_path = write_csv(metric_rows(report), out / "metrics.csv")
    written = [json_path, csv_path]
    if not args.no_plots:
        kid_png = plot_per_class_kid(report, out / "kid_per_class.png")
        written += [kid_png] if kid_png else []
        if train is not None:
            by_name_fake = {it.name: it for it in fake.items}
            by_name_train = {it.name: it for it in train.items}
            for space, res in report["spaces"].items():
                png = plot_nn_pairs(
                    res["memorisation"]["closest_pairs"],
                    lambda n: by_name_fake[n].loader(),
                    lambda n: by_name_train[n].loader(),
                    out / f"nearest_neighbours_{space}.png",
                    title=f"closest synthetic/training pairs in {space} space (cosine distance; red: near-copy)",
                )
                written.append(png)
    print("\n".join(summary_lines(report)))
    for p in written:
        print(f"wrote {p}", file=sys.stderr)
    return 0
