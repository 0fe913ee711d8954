#!/usr/bin/env python3
"""The simulator's warm start under signed membership: its wall time, how many members
each node bound, and (``--profile``) where the time goes.

    python bench/sim_warm_profile.py --nodes 2000                  # time + bindings
    python bench/sim_warm_profile.py --nodes 600 --profile         # + cProfile top 25
    python bench/sim_warm_profile.py --nodes 600 --node-identity off

A node "bound" a member when it holds the member's credential (``Member.cred``); in
``require`` mode a node that did not bind a member cannot take its word.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from rumor.simulations.scenarios import Params, make_sim, warm_cluster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=600)
    ap.add_argument("--node-identity", default="require")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    n = args.nodes
    sim, _ = make_sim(Params(nodes=n, seed=1, node_identity=args.node_identity))
    pr = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if pr:
        pr.enable()
    warm_cluster(sim, n)
    if pr:
        pr.disable()
    print(f"{args.node_identity} {n}: warm start {time.perf_counter() - t0:.1f} s")
    if args.node_identity != "off":
        bound = [sum(1 for m in node.core.members.values() if m.cred is not None)
                 for node in sim.nodes]
        short = [(i, b) for i, b in enumerate(bound) if b < n]
        print(f"nodes that bound fewer than {n}: {len(short)} {short[:10]}")
    if pr:
        st = pstats.Stats(pr)
        st.sort_stats("tottime").print_stats(18)
        st.sort_stats("cumtime").print_stats(25)


if __name__ == "__main__":
    main()
