"""µs per pick of each balancer (proxy/balancers.py) at 3 and 100 instances.

    python bench/balancer_cost.py

Two ways: the same candidate list object every pick, as the outbound shell passes it
(cached per destination until the catalog changes, so the balancer's filtered pool is
cached too), and a fresh list each pick (the worst case: a retry's, or a subset being
rebuilt). Weights 1-3, slow start on (default 10 s window) but long over, no
exclusions; hash picks hash a different 16-byte key each time. Also the one-off cost of
a Maglev table build at the table sizes used (``table_size_for``).
"""

from __future__ import annotations

import random
import timeit
from dataclasses import dataclass

from rumor.policy.documents import BALANCERS, BalancerSpec, HashOn
from rumor.proxy.balancers import maglev_table, make_balancer, table_size_for


@dataclass(frozen=True, slots=True)
class Ep:
    key: str
    weight: int


def per_pick(algorithm: str, n: int, number: int = 20_000, fresh: bool = False) -> float:
    rng = random.Random(1)
    hash_on = HashOn(header="x-user") if algorithm == "hash" else None
    lb = make_balancer(BalancerSpec(algorithm, hash_on), rng, 10.0)
    cands = [Ep(f"node-{i}/web", 1 + i % 3) for i in range(n)]
    keys = [rng.randbytes(16) for _ in range(1024)]
    lb.pick(0.0, list(cands), keys[0])  # builds the hash table, starts warm
    for e in cands:
        lb.start(e.key, 0.0)
        lb.finish(e.key, 0.0, 0.004)
    now = 100.0
    i = 0

    def one() -> None:
        nonlocal i
        i += 1
        lb.pick(now, list(cands) if fresh else cands, keys[i & 1023])

    best = min(timeit.repeat(one, number=number, repeat=5))
    return best / number * 1e6


def main() -> None:
    print(f"{'algorithm':<14}{'3 same':>9}{'3 fresh':>9}{'100 same':>10}{'100 fresh':>11}"
          "   (µs per pick)")
    for a in BALANCERS:
        print(f"{a:<14}{per_pick(a, 3):>9.2f}{per_pick(a, 3, fresh=True):>9.2f}"
              f"{per_pick(a, 100):>10.2f}{per_pick(a, 100, fresh=True):>11.2f}")
    for n in (3, 50, 100):
        keys = [f"node-{i}/web" for i in range(n)]
        size = table_size_for(n)
        t = min(timeit.repeat(lambda keys=keys, size=size: maglev_table(
            keys, [1] * len(keys), size), number=1, repeat=3))
        print(f"maglev table build, {n} instances, {size} slots: {t * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
