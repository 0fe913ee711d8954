"""Transmit-limited broadcast queue.

Every update is piggybacked on outgoing packets a bounded number of times
(``GossipConfig.retransmit_limit``), least-sent first so fresh news spreads before
old news is repeated. An update replaces a queued one with the same key (a newer
alive/suspect/dead about the same member), so the queue never carries stale facts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Item:
    key: str | None
    data: bytes
    transmits: int
    serial: int


class BroadcastQueue:
    #: No useful message is smaller; stop filling a packet below this.
    MIN_MESSAGE = 8

    def __init__(self, max_items: int = 4096) -> None:
        self.max_items = max_items
        # transmits -> {serial: item}; dicts keep insertion order, newest last.
        self._buckets: dict[int, dict[int, _Item]] = {}
        self._by_key: dict[str, _Item] = {}
        self._serial = 0
        self._len = 0
        self.dropped = 0

    def __len__(self) -> int:
        return self._len

    def push(self, data: bytes, key: str | None = None) -> None:
        """Queue ``data``; a queued item with the same ``key`` is replaced."""
        if key is not None:
            old = self._by_key.pop(key, None)
            if old is not None:
                self._remove(old)
        self._serial += 1
        item = _Item(key, data, 0, self._serial)
        self._buckets.setdefault(0, {})[item.serial] = item
        self._len += 1
        if key is not None:
            self._by_key[key] = item
        if self._len > self.max_items:
            self._drop_most_sent()

    def take(self, budget: int, limit: int, seen: set[int] | None = None) -> list[bytes]:
        """Pop up to ``budget`` bytes of items, least transmitted (then newest) first.

        Each taken item counts one transmit; items reaching ``limit`` leave the queue.
        ``seen`` (filled with the serials taken) lets several takes fill one packet
        without putting an item in it twice, which would burn a transmit for nothing."""
        out: list[bytes] = []
        taken: list[_Item] = []
        for t in sorted(self._buckets):
            if budget < self.MIN_MESSAGE:
                break
            for item in reversed(self._buckets[t].values()):
                if seen is not None and item.serial in seen:
                    continue
                if len(item.data) <= budget:
                    out.append(item.data)
                    taken.append(item)
                    budget -= len(item.data)
                    if budget < self.MIN_MESSAGE:
                        break
        for item in taken:
            self._remove(item)
            if seen is not None:
                seen.add(item.serial)
        # Re-file oldest first so that, within a bucket, newer items stay in front.
        for item in reversed(taken):
            item.transmits += 1
            if item.transmits < limit:
                self._buckets.setdefault(item.transmits, {})[item.serial] = item
                self._len += 1
            elif item.key is not None:
                del self._by_key[item.key]
        return out

    def contains(self, key: str) -> bool:
        return key in self._by_key

    def transmits(self, key: str) -> int | None:
        item = self._by_key.get(key)
        return None if item is None else item.transmits

    def _remove(self, item: _Item) -> None:
        bucket = self._buckets[item.transmits]
        del bucket[item.serial]
        if not bucket:
            del self._buckets[item.transmits]
        self._len -= 1

    def _drop_most_sent(self) -> None:
        """Over capacity: drop the item that was sent most (oldest among equals)."""
        t = max(self._buckets)
        item = next(iter(self._buckets[t].values()))
        self._remove(item)
        if item.key is not None:
            del self._by_key[item.key]
        self.dropped += 1
