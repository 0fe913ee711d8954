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
        #: How many queued items have each length: once a packet's free space is below
        #: the shortest, ``take`` can stop scanning (a join storm queues thousands of
        #: alives of 20-30 bytes, and the scan for one that still fits went through
        #: all of them for every datagram).
        self._sizes: dict[int, int] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return self._len

    def push(self, data: bytes, key: str | None = None, extra: int = 0) -> None:
        """Queue ``data``; a queued item with the same ``key`` is replaced. ``extra``
        more transmits than the limit (it starts below zero, so it also goes first)."""
        if key is not None:
            old = self._by_key.pop(key, None)
            if old is not None:
                self._remove(old)
        self._serial += 1
        item = _Item(key, data, -extra, self._serial)
        self._buckets.setdefault(-extra, {})[item.serial] = item
        self._len += 1
        self._sizes[len(data)] = self._sizes.get(len(data), 0) + 1
        if key is not None:
            self._by_key[key] = item
        if self._len > self.max_items:
            self._drop_most_sent()

    def take(self, budget: int, limit: int, seen: set[int] | None = None) -> list[bytes]:
        """Pop up to ``budget`` bytes of items, least transmitted (then newest) first.

        Each taken item counts one transmit; items reaching ``limit`` leave the queue.
        ``seen`` (filled with the serials taken) lets several takes fill one packet
        without putting an item in it twice, which would burn a transmit for nothing."""
        # Called for every datagram, and a busy queue fills one with ~55 items: the
        # per-item work is kept inline (this is most of a join storm's send path).
        buckets = self._buckets
        if not buckets:
            return []
        # Below this no queued item fits: stopping there skips nothing takeable.
        floor = max(self.MIN_MESSAGE, min(self._sizes))
        taken: list[_Item] = []
        for t in sorted(buckets):
            if budget < floor:
                break
            bucket = buckets[t]
            got: list[_Item] = []
            for item in reversed(bucket.values()):
                if seen is not None and item.serial in seen:
                    continue
                size = len(item.data)
                if size <= budget:
                    got.append(item)
                    budget -= size
                    if budget < floor:
                        break
            if got:
                for item in got:
                    del bucket[item.serial]
                if not bucket:
                    del buckets[t]
                taken += got
        if not taken:
            return []
        self._len -= len(taken)
        if seen is not None:
            seen.update(item.serial for item in taken)
        # Re-file oldest first so that, within a bucket, newer items stay in front.
        for item in reversed(taken):
            item.transmits += 1
            if item.transmits < limit:
                nxt = buckets.get(item.transmits)
                if nxt is None:
                    nxt = buckets[item.transmits] = {}
                nxt[item.serial] = item
                self._len += 1
            else:
                self._forget_size(item)
                if item.key is not None:
                    del self._by_key[item.key]
        return [item.data for item in taken]

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
        self._forget_size(item)

    def _forget_size(self, item: _Item) -> None:
        size = len(item.data)
        left = self._sizes[size] - 1
        if left:
            self._sizes[size] = left
        else:
            del self._sizes[size]

    def _drop_most_sent(self) -> None:
        """Over capacity: drop the item that was sent most (oldest among equals)."""
        t = max(self._buckets)
        item = next(iter(self._buckets[t].values()))
        self._remove(item)
        if item.key is not None:
            del self._by_key[item.key]
        self.dropped += 1
