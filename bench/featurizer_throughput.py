"""Featurizer throughput: queries per second for normalization + hashed n-gram ids.

The featurizer runs once per distinct query when shards are written and once per query at
serving time, in Python; this prints how fast one core does it, per setting.

    .venv/bin/python bench/featurizer_throughput.py [--queries N]
"""

from __future__ import annotations

import argparse
import time

from core.config import GenerateConfig
from querylog.generator import build_universe
from trainers.featurizer import Featurizer, normalize_query


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100_000)
    args = parser.parse_args()
    texts = [
        t.upper() + "  " for t in build_universe(GenerateConfig(num_queries=args.queries)).texts
    ]
    print(f"{len(texts):,} generated queries, mean {sum(map(len, texts)) / len(texts):.1f} chars")
    t0 = time.perf_counter()
    normalized = [normalize_query(t) for t in texts]
    dt = time.perf_counter() - t0
    print(f"{'normalize_query':<34}{len(texts) / dt:>14,.0f} queries/s")
    for name, f in [
        ("word 1-2 grams", Featurizer(1 << 20, 2)),
        ("word 1-3 grams", Featurizer(1 << 20, 3)),
        ("word 1-2 + char 3-5 grams", Featurizer(1 << 20, 2, 3, 5)),
    ]:
        t0 = time.perf_counter()
        total = sum(len(f.ids(q)) for q in normalized)
        dt = time.perf_counter() - t0
        print(
            f"{'ids: ' + name:<34}{len(texts) / dt:>14,.0f} queries/s  {total / len(texts):6.1f} ids/query"
        )


if __name__ == "__main__":
    main()
