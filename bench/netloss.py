"""Packet loss on loopback for the benches: nftables drops a share of gossip traffic.

``Loss(0.1, ports)`` drops 10% of the packets to and from the agents' gossip ports,
UDP and TCP both ways, on loopback input, in a table of its own (``rumor_bench_loss``);
``close()`` deletes the table. Needs root and nftables (``numgen random``).
"""

from __future__ import annotations

import subprocess

TABLE = "rumor_bench_loss"


class Loss:
    def __init__(self, fraction: float, ports: list[int]) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"loss must be between 0 and 1, got {fraction}")
        pct = round(fraction * 100)
        ports_set = ", ".join(map(str, ports))
        rules = [f"udp dport {{ {ports_set} }}", f"tcp dport {{ {ports_set} }}",
                 f"tcp sport {{ {ports_set} }}"]
        script = (f"table inet {TABLE} {{\n chain input {{\n"
                  "  type filter hook input priority 0; policy accept;\n"
                  + "".join(f"  iifname lo {r} numgen random mod 100 < {pct} drop\n"
                            for r in rules) + " }\n}\n")
        subprocess.run(["nft", "-f", "-"], input=script.encode(), check=True)

    def close(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", TABLE], check=False,
                       stderr=subprocess.DEVNULL)

