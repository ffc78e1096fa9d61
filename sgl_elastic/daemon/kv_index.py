"""Prefix index of cached KV: token-id sequences -> KV slots, with a slot budget and LRU eviction.

Pure Python (no torch, no sockets). The daemon keeps one index for the node; slot ids are the same
on every TP rank (SGLang's schedulers make identical allocation decisions on all ranks, so slot s
of rank r holds the KV heads of rank r for the same token), hence one slot list serves every rank.

Structure: a trie of *pages* (``page_size`` tokens each, as SGLang's radix cache with paging):
a node holds the slots of one page and is reached by the token ids of every page before it.
A trailing partial page is never cached. ``namespace`` keeps prefixes apart that share token ids
but not KV (SGLang's ``RadixKey.extra_key``: LoRA adapter, cache salt): one trie per namespace.

Pins: ``match(..., pin=True)`` / ``insert(..., pin=True)`` lock every node on the path (KV of a
running request) until ``release(pin_id)`` or ``release_owner(pid)`` (the owner process died).
Eviction removes only unpinned *leaves*, least recently used first; removing a leaf may make its
parent an evictable leaf. Pinned nodes and their ancestors are never evicted.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["PrefixIndex", "MatchResult", "InsertResult", "BudgetExceeded"]


class BudgetExceeded(Exception):
    """Inserting would exceed the slot budget and not enough unpinned KV can be evicted."""


@dataclass(slots=True, eq=False)
class _Node:
    key: tuple[int, ...]
    slots: tuple[int, ...]
    parent: "_Node | None"
    children: dict[tuple[int, ...], "_Node"] = field(default_factory=dict)
    lock: int = 0
    last_access: int = 0
    alive: bool = True


@dataclass(frozen=True, slots=True)
class MatchResult:
    num_tokens: int  # tokens of the query covered by the cached prefix (a multiple of page_size)
    slots: tuple[int, ...]  # [num_tokens] KV slot of each matched token
    pin_id: int = 0  # 0: not pinned


@dataclass(frozen=True, slots=True)
class InsertResult:
    num_new_tokens: int  # tokens newly cached by this insert
    duplicate_slots: tuple[int, ...]  # caller's slots of pages that were cached already (caller frees them)
    evicted_slots: tuple[int, ...]  # slots evicted to stay within the budget (caller frees them)
    pin_id: int = 0


class PrefixIndex:
    """Token-prefix -> KV slots, ``num_slots`` slots in the pool, at most ``budget_slots`` cached.

    Args:
        num_slots: slots in each rank's KV pool (valid slot ids are ``[0, num_slots)``).
        budget_slots: most slots the index may hold (pinned included); default ``num_slots``.
        page_size: tokens per trie node.
    """

    def __init__(self, num_slots: int, budget_slots: int | None = None, page_size: int = 1) -> None:
        if num_slots < 1 or page_size < 1:
            raise ValueError(f"num_slots={num_slots} and page_size={page_size} must be >= 1")
        budget = num_slots if not budget_slots else budget_slots
        if not 1 <= budget <= num_slots:
            raise ValueError(f"budget_slots={budget_slots} must be in [1, num_slots={num_slots}]")
        self.num_slots = num_slots
        self.budget_slots = budget
        self.page_size = page_size
        self._roots: dict[str, _Node] = {}  # namespace -> root (no slots)
        self._clock = itertools.count(1)
        self._pin_ids = itertools.count(1)
        self._pins: dict[int, tuple[int, list[_Node]]] = {}  # pin_id -> (owner pid, path)
        self._held: set[int] = set()  # every slot the index holds
        self.num_nodes = 0
        self.hit_tokens = 0
        self.lookup_tokens = 0
        self.evicted_total = 0

    # ---- queries ------------------------------------------------------------------------------
    @property
    def cached_slots(self) -> int:
        return len(self._held)

    @property
    def pinned_slots(self) -> int:
        seen: set[int] = set()
        for _, path in self._pins.values():
            for n in path:
                seen.update(n.slots)
        return len(seen)

    @property
    def num_pins(self) -> int:
        return len(self._pins)

    def pin_owners(self) -> set[int]:
        """Owner pids of the live pins (0, "no owner", excluded)."""
        return {o for o, _ in self._pins.values() if o}

    def holds(self, slot: int) -> bool:
        return slot in self._held

    def held_slots(self) -> frozenset[int]:
        """Every slot the index holds now."""
        return frozenset(self._held)

    def _pages(self, token_ids: Sequence[int]) -> list[tuple[int, ...]]:
        p = self.page_size
        n = len(token_ids) // p * p
        return [tuple(token_ids[i:i + p]) for i in range(0, n, p)]

    def _root(self, namespace: str, create: bool = False) -> _Node | None:
        root = self._roots.get(namespace)
        if root is None and create:
            root = self._roots[namespace] = _Node(key=(), slots=(), parent=None)
        return root

    def _walk(self, pages: list[tuple[int, ...]], namespace: str) -> list[_Node]:
        node = self._root(namespace)
        path: list[_Node] = []
        if node is None:
            return path
        for page in pages:
            node = node.children.get(page)  # type: ignore[assignment]
            if node is None:
                break
            path.append(node)
        return path

    def _touch(self, path: list[_Node]) -> None:
        t = next(self._clock)
        for n in path:
            n.last_access = t

    def _pin(self, path: list[_Node], owner: int) -> int:
        for n in path:
            n.lock += 1
        pin_id = next(self._pin_ids)
        self._pins[pin_id] = (owner, list(path))
        return pin_id

    def match(self, token_ids: Sequence[int], *, pin: bool = False, owner: int = 0,
              namespace: str = "") -> MatchResult:
        """Longest cached prefix of ``token_ids`` in whole pages; marks it recently used."""
        path = self._walk(self._pages(token_ids), namespace)
        self._touch(path)
        slots = tuple(s for n in path for s in n.slots)
        self.lookup_tokens += len(token_ids)
        self.hit_tokens += len(slots)
        pin_id = self._pin(path, owner) if pin and path else 0
        return MatchResult(len(slots), slots, pin_id)

    # ---- updates ------------------------------------------------------------------------------
    def insert(self, token_ids: Sequence[int], slots: Sequence[int], *, pin: bool = False,
               owner: int = 0, namespace: str = "") -> InsertResult:
        """Cache ``slots[i]`` as the KV of ``token_ids[i]`` for every whole page.

        Pages already cached keep their slots; the caller's slots for them come back as
        ``duplicate_slots``. Evicts LRU unpinned KV first when the budget would be exceeded; raises
        ``BudgetExceeded`` (nothing changed) when that is not enough. Slots of a trailing partial
        page are neither cached nor returned (the caller still owns them).
        """
        if len(slots) != len(token_ids):
            raise ValueError(f"{len(token_ids)} token ids but {len(slots)} slots; give one slot per token")
        pages = self._pages(token_ids)
        n_full = len(pages) * self.page_size
        # Step 1: validate the caller's slots before touching anything.
        bad = [s for s in slots[:n_full] if not 0 <= s < self.num_slots]
        if bad:
            raise ValueError(f"slots {bad[:8]} outside the pool [0, {self.num_slots})")
        if len(set(slots[:n_full])) != n_full:
            raise ValueError("slots repeat within one insert; each token needs its own slot")
        path = self._walk(pages, namespace)
        n_old = len(path) * self.page_size
        new_slots = slots[n_old:n_full]
        taken = [s for s in new_slots if s in self._held]
        if taken:
            raise ValueError(
                f"slots {taken[:8]} are already cached for another prefix; free only slots the index"
                " returned (evicted/duplicate) or never inserted"
            )
        # Step 2: room within the budget (the matched path is protected while evicting).
        need = self.cached_slots + len(new_slots) - self.budget_slots
        evicted: list[int] = []
        if need > 0:
            for n in path:
                n.lock += 1
            try:
                # A node with lock 0 has no pinned descendant (pins lock the whole path), so every
                # unlocked slot can go, leaves first: check before evicting anything.
                evictable = sum(len(n.slots) for n in self._nodes() if n.lock == 0)
                if evictable < need:
                    raise BudgetExceeded(
                        f"caching {len(new_slots)} more slots needs {need} evicted but only {evictable} are"
                        f" unpinned (budget {self.budget_slots}, cached {self.cached_slots}, pinned"
                        f" {self.pinned_slots}); release pins or raise budget_slots"
                    )
                evicted = self._evict(need)
            finally:
                for n in path:
                    n.lock -= 1
        # Step 3: new nodes for the uncached pages.
        node = path[-1] if path else self._root(namespace, create=True)
        full_path = list(path)
        for i in range(len(path), len(pages)):
            s = tuple(slots[i * self.page_size:(i + 1) * self.page_size])
            child = _Node(key=pages[i], slots=s, parent=node)
            node.children[pages[i]] = child
            self._held.update(s)
            self.num_nodes += 1
            full_path.append(child)
            node = child
        self._touch(full_path)
        pin_id = self._pin(full_path, owner) if pin and full_path else 0
        return InsertResult(len(new_slots), tuple(slots[:n_old]), tuple(evicted), pin_id)

    def release(self, pin_id: int) -> None:
        """Unpin; KeyError naming the pin when it is unknown (already released?)."""
        try:
            _, path = self._pins.pop(pin_id)
        except KeyError:
            raise KeyError(f"pin {pin_id} is not held (released twice, or its owner died)") from None
        for n in path:
            n.lock -= 1

    def release_owner(self, owner: int) -> int:
        """Release every pin of ``owner`` (a dead process); returns how many."""
        ids = [p for p, (o, _) in self._pins.items() if o == owner]
        for p in ids:
            self.release(p)
        return len(ids)

    def evict(self, num_slots: int = 0) -> list[int]:
        """Free at least ``num_slots`` unpinned slots, LRU leaves first (0: down to the budget).

        Returns the freed slots (possibly fewer when the rest is pinned)."""
        if num_slots <= 0:
            num_slots = max(0, self.cached_slots - self.budget_slots)
        return self._evict(num_slots)

    def forget(self, slots: Sequence[int], namespace: str | None = None) -> list[int]:
        """The owner of the pool freed ``slots``: drop every node using one of them, with its subtree
        (a suffix's KV is useless without its prefix), pinned or not. Returns the slots dropped.

        ``namespace``: only that namespace (None: all). Must reach the index before the freed slots
        are written again, or a later reader would map tokens to another request's KV.
        """
        gone = set(slots) & self._held
        if not gone:
            return []
        roots = self._roots if namespace is None else {namespace: self._roots[namespace]} if namespace in self._roots else {}
        doomed = []
        for root in roots.values():
            stack = list(root.children.values())
            while stack:
                n = stack.pop()
                if gone.isdisjoint(n.slots):
                    stack.extend(n.children.values())
                else:
                    doomed.append(n)  # its subtree goes with it
        dropped: list[int] = []
        for n in doomed:
            parent = n.parent
            assert parent is not None
            del parent.children[n.key]
            stack = [n]
            while stack:
                m = stack.pop()
                m.alive = False
                self._held.difference_update(m.slots)
                dropped.extend(m.slots)
                self.num_nodes -= 1
                stack.extend(m.children.values())
        self._roots = {ns: r for ns, r in self._roots.items() if r.children}
        # pins whose path lost a node keep nothing alive; drop them so they do not count as pinned
        for pid in [p for p, (_, path) in self._pins.items() if any(not m.alive for m in path)]:
            del self._pins[pid]
        return dropped

    def clear(self) -> list[int]:
        """Drop everything (pins included: the KV is gone, e.g. after a layout change)."""
        freed = sorted(self._held)
        self._roots = {}
        self._pins.clear()
        self._held.clear()
        self.num_nodes = 0
        return freed

    def dump(self) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """Every cached prefix ending at a leaf, as (namespace, token ids, slots): what a replacement
        process needs to rebuild its own prefix tree (inner prefixes are prefixes of these)."""
        out = []
        for ns, root in self._roots.items():
            stack = [(n, (), ()) for n in root.children.values()]
            while stack:
                n, toks, slots = stack.pop()
                toks, slots = toks + n.key, slots + n.slots
                if n.children:
                    stack.extend((c, toks, slots) for c in n.children.values())
                else:
                    out.append((ns, toks, slots))
        return sorted(out)

    def _evict(self, num_slots: int) -> list[int]:
        if num_slots <= 0:
            return []
        heap = [(n.last_access, id(n), n) for n in self._leaves() if n.lock == 0]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_slots:
            t, _, n = heapq.heappop(heap)
            if not n.alive or n.children or n.lock or t != n.last_access:
                continue
            parent = n.parent
            assert parent is not None
            del parent.children[n.key]
            n.alive = False
            self._held.difference_update(n.slots)
            freed.extend(n.slots)
            self.num_nodes -= 1
            if parent.parent is None:
                if not parent.children:  # an empty namespace goes too
                    self._roots = {ns: r for ns, r in self._roots.items() if r is not parent}
            elif not parent.children and parent.lock == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        self.evicted_total += len(freed)
        return freed

    def _nodes(self):
        stack = [n for root in self._roots.values() for n in root.children.values()]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            yield n

    def _leaves(self):
        stack = [n for root in self._roots.values() for n in root.children.values()]
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            else:
                yield n
