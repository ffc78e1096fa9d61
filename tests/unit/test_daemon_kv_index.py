"""PrefixIndex: prefix matching, pins, budget, LRU eviction (pure code, no daemon)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_elastic.daemon.kv_index import BudgetExceeded, PrefixIndex


def test_match_returns_longest_cached_prefix():
    ix = PrefixIndex(num_slots=32)
    ix.insert([1, 2, 3, 4], [10, 11, 12, 13])
    m = ix.match([1, 2, 3, 9, 9])
    assert (m.num_tokens, m.slots) == (3, (10, 11, 12))
    assert ix.match([7]).num_tokens == 0
    assert ix.hit_tokens == 3 and ix.lookup_tokens == 6


def test_forget_drops_nodes_using_freed_slots_with_their_subtrees():
    ix = PrefixIndex(num_slots=32)
    ix.insert([1, 2, 3], [10, 11, 12])
    ix.insert([1, 2, 4, 5], [10, 11, 13, 14])
    pin = ix.match([1, 2, 3], pin=True).pin_id
    assert sorted(ix.forget([11, 31])) == [11, 12, 13, 14]  # pinned or not: the KV is gone
    assert ix.match([1, 2, 3]).slots == (10,)
    assert not ix.holds(12) and ix.holds(10) and ix.cached_slots == 1
    assert ix.num_pins == 0 and ix.pinned_slots == 0
    with pytest.raises(KeyError):
        ix.release(pin)
    assert ix.forget([10]) == [10] and ix.dump() == [] and ix.num_nodes == 0


def test_pages_cache_only_whole_pages():
    ix = PrefixIndex(num_slots=32, page_size=2)
    r = ix.insert([1, 2, 3, 4, 5], [0, 1, 2, 3, 4])
    assert r.num_new_tokens == 4 and ix.cached_slots == 4 and not ix.holds(4)
    assert ix.match([1, 2, 3]).slots == (0, 1)  # the partial page [3] is not matched


def test_duplicate_pages_return_callers_slots():
    ix = PrefixIndex(num_slots=32)
    ix.insert([1, 2], [0, 1])
    r = ix.insert([1, 2, 3], [5, 6, 7])
    assert r.duplicate_slots == (5, 6) and r.num_new_tokens == 1
    assert ix.match([1, 2, 3]).slots == (0, 1, 7)


def test_insert_rejects_bad_slots_with_reason():
    ix = PrefixIndex(num_slots=8)
    with pytest.raises(ValueError, match="outside the pool"):
        ix.insert([1], [8])
    with pytest.raises(ValueError, match="repeat"):
        ix.insert([1, 2], [3, 3])
    ix.insert([1], [3])
    with pytest.raises(ValueError, match="already cached"):
        ix.insert([2], [3])
    with pytest.raises(ValueError, match="one slot per token"):
        ix.insert([1, 2], [1])


def test_lru_evicts_coldest_leaf_first():
    ix = PrefixIndex(num_slots=16)
    ix.insert([1, 2], [0, 1])
    ix.insert([3, 4], [2, 3])
    ix.match([1, 2])  # [3, 4] is now the coldest
    assert sorted(ix.evict(2)) == [2, 3]
    assert ix.match([1, 2]).num_tokens == 2 and ix.match([3]).num_tokens == 0


def test_eviction_never_touches_pinned_kv():
    ix = PrefixIndex(num_slots=16)
    pinned = ix.insert([1, 2, 3], [0, 1, 2], pin=True, owner=42)
    ix.insert([9], [9])
    freed = ix.evict(100)
    assert freed == [9]
    assert ix.match([1, 2, 3]).num_tokens == 3
    ix.release(pinned.pin_id)
    assert sorted(ix.evict(100)) == [0, 1, 2]
    with pytest.raises(KeyError, match="not held"):
        ix.release(pinned.pin_id)


def test_pinned_prefix_protects_ancestors_but_not_siblings():
    ix = PrefixIndex(num_slots=16)
    ix.insert([1, 2, 3], [0, 1, 2])
    ix.insert([1, 2, 4], [5, 6, 7])  # shares [1, 2]: 5, 6 come back as duplicates
    m = ix.match([1, 2, 3], pin=True, owner=7)
    assert ix.pinned_slots == 3
    assert ix.evict(100) == [7]  # only the unpinned sibling leaf
    assert ix.release_owner(7) == 1 and ix.pinned_slots == 0
    assert m.pin_id


def test_budget_evicts_then_refuses_when_pinned():
    ix = PrefixIndex(num_slots=8, budget_slots=4)
    ix.insert([1, 2], [0, 1])
    r = ix.insert([5, 6, 7], [2, 3, 4])  # 5 > 4: one slot of the cold prefix goes, its leaf first
    assert r.evicted_slots == (1,) and ix.cached_slots == 4
    assert ix.match([1, 2]).slots == (0,)
    ix.match([5, 6, 7], pin=True)
    with pytest.raises(BudgetExceeded, match="release pins or raise budget_slots"):
        ix.insert([8, 9], [5, 6])
    assert ix.cached_slots == 4 and ix.match([1]).slots == (0,)  # nothing changed


def test_insert_protects_its_own_matched_prefix_while_evicting():
    ix = PrefixIndex(num_slots=8, budget_slots=3)
    ix.insert([1, 2], [0, 1])
    ix.insert([9], [2])
    ix.match([9])  # [1, 2] is colder than [9]
    r = ix.insert([1, 2, 3], [4, 5, 6])  # extends [1, 2]; must evict [9], not its own prefix
    assert r.evicted_slots == (2,)
    assert ix.match([1, 2, 3]).slots == (0, 1, 6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["insert", "match", "evict", "release"]),
                          st.lists(st.integers(0, 3), min_size=1, max_size=6), st.booleans()), max_size=40))
def test_random_operations_keep_invariants(ops):
    """Slots are never held twice, the budget holds, pinned KV survives every eviction."""
    ix = PrefixIndex(num_slots=24, budget_slots=12)
    free = list(range(24))
    pins: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for kind, tokens, pin in ops:
        if kind == "insert" and len(free) >= len(tokens):
            slots = [free.pop() for _ in tokens]
            try:
                r = ix.insert(tokens, slots, pin=pin, owner=1)
            except BudgetExceeded:
                free.extend(slots)
                continue
            free.extend(r.duplicate_slots)
            free.extend(r.evicted_slots)
            if r.pin_id:
                pins[r.pin_id] = (tuple(tokens), ix.match(tokens).slots)
        elif kind == "match":
            m = ix.match(tokens, pin=pin, owner=1)
            if m.pin_id:
                pins[m.pin_id] = (tuple(tokens[:m.num_tokens]), m.slots)
        elif kind == "evict":
            free.extend(ix.evict(len(tokens)))
        elif kind == "release" and pins:
            pin_id = next(iter(pins))
            ix.release(pin_id)
            del pins[pin_id]
        # invariants
        assert ix.cached_slots <= ix.budget_slots
        assert len(set(free)) == len(free) and not any(ix.holds(s) for s in free)
        assert len(free) + ix.cached_slots == 24
        for toks, slots in pins.values():
            assert ix.match(toks).slots[:len(slots)] == slots


def test_namespaces_keep_equal_tokens_apart_and_dump_lists_leaf_prefixes():
    ix = PrefixIndex(num_slots=16)
    ix.insert([1, 2, 3], [0, 1, 2])
    ix.insert([1, 2, 4], [5, 6, 7])
    ix.insert([1, 2], [8, 9], namespace="lora-a")
    assert ix.match([1, 2], namespace="lora-a").slots == (8, 9)
    assert ix.match([1, 2, 3], namespace="lora-b").num_tokens == 0
    assert ix.dump() == [("", (1, 2, 3), (0, 1, 2)), ("", (1, 2, 4), (0, 1, 7)), ("lora-a", (1, 2), (8, 9))]
    ix.match([1, 2, 3])
    ix.match([1, 2, 4])
    assert sorted(ix.evict(2)) == [8, 9]  # the coldest prefix, its namespace goes with it
    assert [ns for ns, _, _ in ix.dump()] == ["", ""]
