"""The only places where the simulator reaches into the core's private state.

They set up a *warm* cluster (one that has been running for a while) cheaply; none of
them changes how the protocol behaves afterwards. Each names the public hook that
would replace it (docs/simulations.md, "What the core could offer").
"""

from __future__ import annotations

import random

from ..gossip.membership import Membership
from ..gossip.queue import BroadcastQueue
from ..gossip.wire import PushPull


def install_state(core: Membership, now: float, pp: PushPull) -> None:
    """Merge a full member list, as a push-pull exchange would, without decoding the
    same frame again for every node (``handle_stream`` would; 10^6 rows at 1,000
    nodes). Proposed hook: ``Membership.merge_state(now, states)``."""
    core._merge(now, pp)


def forget_join_storm(core: Membership) -> None:
    """Drop the alive broadcasts that merging queued: in a warm cluster everybody has
    known those facts for a long time. Proposed hook: a ``quiet`` flag on the merge."""
    core._member_q = BroadcastQueue()


def steady_push_pull(core: Membership, now: float, rng: random.Random) -> None:
    """A core created just now schedules its first push-pull within 0.5–1.5 base
    intervals, so a cluster started at one instant runs n push-pulls in its first
    45 s; in a cluster that has been up for a while they are spread uniformly over the
    period scaled to its size. Proposed hook: schedule the next push-pull from
    ``push_pull_period(n)`` after every merge that grows the member table."""
    period = core.config.push_pull_period(core.num_members())
    core._push_pull_at = now + rng.uniform(0.0, period)
