"""Write an event stream as a LightGCN-format dataset (``train.txt`` / ``test.txt``), so the
offline DSL benchmark (``benchmarks/dsl.py --data DIR``) can be checked on more than Gowalla.

Run: ``python benchmarks/lightgcn_split.py --source ml-100k --out DIR [--test-frac 0.2] [--seed 0] [--positives-only]``

Every (user, item) pair the stream holds is one implicit interaction (duplicates once); each
user's pairs are split at random, ``test_frac`` to test (at least one when she has two or more),
the rest to train, as the maintainers' check set is split (80/20 per user). Users and items are
renumbered densely from 0 in order of first appearance. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/lightgcn_split.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import emit


def split_per_user(
    pairs: list[tuple[str, str]], test_frac: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-user random split of de-duplicated (user, item) pairs into train and test item lists."""
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    by_user: defaultdict[int, dict[int, None]] = defaultdict(dict)  # ordered set of a user's items
    for u, i in pairs:
        uid = users.setdefault(u, len(users))
        iid = items.setdefault(i, len(items))
        by_user[uid][iid] = None
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for uid in range(len(users)):
        mine = np.fromiter(by_user[uid], dtype=np.int64)
        n_test = max(1, int(round(test_frac * len(mine)))) if len(mine) >= 2 else 0
        perm = rng.permutation(len(mine))
        test.append(np.sort(mine[perm[:n_test]]))
        train.append(np.sort(mine[perm[n_test:]]))
    return train, test


def write_lightgcn(rows: list[np.ndarray], path: Path) -> None:
    with path.open("w") as fh:
        for user, row in enumerate(rows):
            fh.write(" ".join([str(user), *map(str, row.tolist())]) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--source", default="ml-100k", help="ml-100k, taobao-sample or a JSONL file of events")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--test-frac", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--positives-only", action="store_true", help="keep only events labelled 1 (ML-100K: rating >= 4)")
    args = ap.parse_args(argv)
    from driftrec.contract.settings import get_settings
    from driftrec.streams.datasets import load_events

    settings = get_settings()
    events = load_events(args.source, settings.data_cache, settings.shared_data)
    kept = [e for e in events if e.label == 1] if args.positives_only else events
    train, test = split_per_user([(e.user_id, e.item_id) for e in kept], args.test_frac, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_lightgcn(train, args.out / "train.txt")
    write_lightgcn(test, args.out / "test.txt")
    n_items = 1 + max(int(r.max()) for r in train + test if len(r))
    emit(
        "lightgcn_split",
        {
            "source": args.source,
            "positives_only": args.positives_only,
            "users": len(train),
            "items": n_items,
            "train_pairs": int(sum(len(r) for r in train)),
            "test_pairs": int(sum(len(r) for r in test)),
            "test_frac": args.test_frac,
            "seed": args.seed,
            "out": str(args.out),
        },
        record=False,
    )


if __name__ == "__main__":
    main()
