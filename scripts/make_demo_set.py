"""Copy the bundled demo set from the shared "Totally Looks Like" data (run once; provenance).

    python scripts/make_demo_set.py ../shared/tll demo/tll --pairs 100 --seed 0

The four right images named in ``KEEP`` are real photos of ImageNet classes that the tests
use to check that the offline backbone weights loaded (golden retriever, sloth, fox squirrel,
cocker spaniel).
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
from pathlib import Path

KEEP = ("cbi", "bto", "epo", "bvp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.source / "pairs.csv", newline="") as handle:
        pairs = [(row["left"], row["right"]) for row in csv.DictReader(handle)]
    kept = [pair for pair in pairs if pair[1] in KEEP]
    rest = [pair for pair in pairs if pair[1] not in KEEP]
    chosen = sorted(kept + random.Random(args.seed).sample(rest, args.pairs - len(kept)))
    for side in ("left", "right"):
        (args.target / side).mkdir(parents=True, exist_ok=True)
    with open(args.target / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["left", "right"])
        for left, right in chosen:
            shutil.copy(args.source / "left" / f"{left}.jpg", args.target / "left")
            shutil.copy(args.source / "right" / f"{right}.jpg", args.target / "right")
            writer.writerow([left, right])


if __name__ == "__main__":
    main()
