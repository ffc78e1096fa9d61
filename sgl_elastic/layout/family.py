"""FamilyLayout: how one sharded tensor family is split over the TP ranks.

Vocabulary (used by the planner and executor too):
- *unit*: the indivisible piece of sharding of a family: one KV head with its query heads ("attn"),
  ``unit_size`` intermediate columns ("mlp", "moe"), one expert ("experts"), ``unit_size`` vocab
  rows ("vocab").
- *dim*: the tensor dimension that is sharded, counted in *elements* (rows or columns of the
  full tensor); ``dim_size`` elements in all. The last unit may be partial (``dim_size`` need not be
  a multiple of ``unit_size``); element ranges are clipped to ``dim_size``.
- *widths*: units per rank, in rank order; rank r holds the contiguous units
  ``[unit_offsets()[r], unit_offsets()[r + 1])``.

Experts may instead be *placed* (``held``, set by the planner after a failure or a rebalance): per
MoE layer and rank, the distinct experts the rank holds, in its *slot order* (the order of its fused
parameters: a rebalance that swaps an expert rewrites one slot and moves no other); together every
expert at least once. The widths are then expert *slots* per rank, summing to ``num_units +
redundant``: with ``redundant`` 0 each expert has one copy; with ``redundant`` > 0
(``--elastic-redundant-experts``) a hot expert may be held by several ranks (its *replicas*), each
routed token goes to one of them (``patches.fused_moe``), and a failure loses no expert another rank
also holds. With no ``held``, rank r holds the contiguous experts of its unit range in every layer.

Attention with fewer KV heads than ranks is *replicated* (as SGLang does): every rank holds exactly
one KV head (width 1), the ranks holding head h form a contiguous group (``kv_head_of_rank``), and
the query heads of head h are split among its replicas as equally as possible. Rank intervals may
then overlap (replicas): the planner treats any replica as a free source.
"""

from __future__ import annotations

import msgspec

from sgl_elastic.layout.widths import UNIT_NOUNS, equal_widths, validate_widths

__all__ = ["FamilyLayout", "FAMILY_NAMES"]

FAMILY_NAMES = ("attn", "mlp", "moe", "experts", "vocab")


class FamilyLayout(msgspec.Struct, frozen=True, kw_only=True):
    """Split of one tensor family over ``len(widths)`` ranks.

    Fields:
        name: one of ``FAMILY_NAMES``.
        unit_name: human name of the unit ("kv_head", "mlp_block", "moe_block", "expert", "vocab_block").
        num_units: units in the family (``ceil(dim_size / unit_size)``).
        unit_size: elements of the sharded dim per unit (attn: 1 KV head; mlp/moe: columns; vocab: rows).
        dim_size: total elements along the sharded dim (attn: KV heads; experts: experts).
        widths: units per rank, ``[tp]``.
        replicated: True for attention with fewer KV heads than ranks (see module docstring).
        num_q_heads, num_kv_heads, q_per_kv: attention only (0 elsewhere).
        kv_head_of_rank: replicated attention only: the KV head each rank holds, ``[tp]``,
            non-decreasing, every head present.
        q_widths: replicated attention only, optional: query heads per rank ``[tp]`` (each group of
            replicas splits its ``q_per_kv`` heads; default: as equal as possible, extra to the lowest).
        redundant: experts only: slots beyond one per expert (``widths`` are then slots per rank).
        held: placed experts only: ``[num_layers][tp]`` experts of each rank in slot order (rows of
            dense layers are ignored; ``with_held``, ``placed``). Empty: contiguous.
    """

    name: str
    unit_name: str
    num_units: int
    unit_size: int
    dim_size: int
    widths: tuple[int, ...]
    replicated: bool = False
    num_q_heads: int = 0
    num_kv_heads: int = 0
    q_per_kv: int = 0
    kv_head_of_rank: tuple[int, ...] = ()
    q_widths: tuple[int, ...] = ()
    redundant: int = 0
    held: tuple[tuple[tuple[int, ...], ...], ...] = ()

    def __post_init__(self) -> None:
        if self.name not in FAMILY_NAMES:
            raise ValueError(f"unknown family {self.name!r}; known families: {', '.join(FAMILY_NAMES)}")
        if self.unit_size <= 0:
            raise ValueError(f"{self.name}: unit_size={self.unit_size} must be >= 1")
        want_units = -(-self.dim_size // self.unit_size)
        if self.num_units != want_units:
            raise ValueError(
                f"{self.name}: num_units={self.num_units} but ceil(dim_size {self.dim_size} / unit_size"
                f" {self.unit_size}) = {want_units}"
            )
        if self.name == "attn":
            if self.num_kv_heads <= 0 or self.num_q_heads % self.num_kv_heads:
                raise ValueError(
                    f"attn: num_q_heads={self.num_q_heads} must be a positive multiple of"
                    f" num_kv_heads={self.num_kv_heads}"
                )
            if self.q_per_kv != self.num_q_heads // self.num_kv_heads:
                raise ValueError(f"attn: q_per_kv={self.q_per_kv} != {self.num_q_heads}/{self.num_kv_heads}")
            if self.num_units != self.num_kv_heads or self.unit_size != 1:
                raise ValueError("attn: one unit is one KV head: need unit_size=1 and num_units=num_kv_heads")
        if self.redundant or self.held:
            self._validate_held()
        elif self.replicated:
            self._validate_replicated()
        else:
            if self.kv_head_of_rank:
                raise ValueError(f"{self.name}: kv_head_of_rank is only for replicated attention")
            validate_widths(self.widths, self.num_units, self.name)

    def _validate_held(self) -> None:
        tp, E = len(self.widths), self.num_units
        if self.name != "experts" or self.replicated:
            raise ValueError(f"{self.name}: only the experts family can place experts or have redundant slots")
        if self.redundant < 0:
            raise ValueError(f"experts: redundant={self.redundant} must be >= 0")
        if not self.held:
            raise ValueError(f"experts: {self.redundant} redundant slots need the experts each rank holds (held)")
        if tp < 1 or any(not 0 <= w <= E for w in self.widths) or sum(self.widths) != E + self.redundant:
            raise ValueError(f"experts: slot widths {self.widths} must each be 0..{E} and sum to {E} experts +"
                             f" {self.redundant} redundant = {E + self.redundant}")
        for i, row in enumerate(self.held):
            if len(row) != tp:
                raise ValueError(f"experts: held of layer {i} has {len(row)} ranks for tp={tp}")
            for r, got in enumerate(row):
                if len(got) != self.widths[r] or len(set(got)) != len(got) or (
                        got and not (0 <= min(got) and max(got) < E)):
                    raise ValueError(f"experts: layer {i} rank {r} holds {got}: want {self.widths[r]} distinct"
                                     f" experts of 0..{E - 1}")
            missing = set(range(E)).difference(*map(set, row))
            if missing:
                raise ValueError(f"experts: layer {i} holds no copy of experts {sorted(missing)[:8]}")

    def _validate_replicated(self) -> None:
        tp = len(self.widths)
        if self.name != "attn":
            raise ValueError(f"{self.name}: only attention can be replicated")
        if any(w != 1 for w in self.widths):
            raise ValueError(
                f"attn (replicated): every rank holds exactly one KV head, got widths {self.widths}"
            )
        heads = self.kv_head_of_rank
        if len(heads) != tp:
            raise ValueError(f"attn (replicated): kv_head_of_rank has {len(heads)} entries for {tp} ranks")
        if any(b < a for a, b in zip(heads, heads[1:])) or sorted(set(heads)) != list(range(self.num_kv_heads)):
            raise ValueError(
                f"attn (replicated): kv_head_of_rank {heads} must be non-decreasing and hold every one of"
                f" the {self.num_kv_heads} KV heads at least once"
            )
        if self.q_widths:
            if len(self.q_widths) != tp or min(self.q_widths) < 1:
                raise ValueError(f"attn (replicated): q_widths {self.q_widths} need one width >= 1 per rank ({tp})")
            for h in range(self.num_kv_heads):
                got = sum(q for q, hh in zip(self.q_widths, heads) if hh == h)
                if got != self.q_per_kv:
                    raise ValueError(
                        f"attn (replicated): the replicas of KV head {h} hold {got} query heads in q_widths"
                        f" {self.q_widths} but the head has {self.q_per_kv}"
                    )
        worst = max(heads.count(h) for h in range(self.num_kv_heads))
        if worst > self.q_per_kv:
            raise ValueError(
                f"attn (replicated): a KV head has {worst} replicas but only {self.q_per_kv} query heads to"
                f" split among them; use at most {self.q_per_kv * self.num_kv_heads} ranks"
            )

    # ---- rank geometry in units -------------------------------------------------------------
    @property
    def num_ranks(self) -> int:
        return len(self.widths)

    def unit_offsets(self) -> tuple[int, ...]:
        """``[tp + 1]``: entry r is rank r's first unit; the last entry is ``num_units``.

        Replicated attention: entry r is ``kv_head_of_rank[r]`` (intervals overlap).
        """
        if self.replicated:
            return self.kv_head_of_rank + (self.num_units,)
        out = [0]
        for w in self.widths:
            out.append(out[-1] + w)
        return tuple(out)

    def rank_unit_range(self, rank: int) -> tuple[int, int]:
        """Units ``[start, end)`` held by ``rank``."""
        self._check_rank(rank)
        if self.replicated:
            h = self.kv_head_of_rank[rank]
            return (h, h + 1)
        start = sum(self.widths[:rank])
        return (start, start + self.widths[rank])

    def rank_dim_range(self, rank: int) -> tuple[int, int]:
        """Elements ``[start, end)`` of the sharded dim held by ``rank`` (clipped to ``dim_size``)."""
        a, b = self.rank_unit_range(rank)
        return (min(a * self.unit_size, self.dim_size), min(b * self.unit_size, self.dim_size))

    def rank_dim_size(self, rank: int) -> int:
        """Elements of the sharded dim held by ``rank``."""
        a, b = self.rank_dim_range(rank)
        return b - a

    # ---- placed experts ------------------------------------------------------------------------
    def rank_experts(self, rank: int, layer: int) -> tuple[int, ...]:
        """Experts of model layer ``layer`` held by ``rank``, in its slot order (ascending unless placed)."""
        self._check_rank(rank)
        if self.held:
            return self.held[layer][rank]
        a, b = self.rank_unit_range(rank)
        return tuple(range(a, b))

    def expert_owner(self, layer: int, expert: int) -> int:
        """The rank holding ``expert`` of model layer ``layer`` (redundant: the lowest that holds it)."""
        if self.held:
            return next(r for r, got in enumerate(self.held[layer]) if expert in got)
        offs = self.unit_offsets()
        return next(r for r in range(self.num_ranks) if offs[r] <= expert < offs[r + 1])

    def expert_holders(self, layer: int, expert: int) -> tuple[int, ...]:
        """Every rank holding ``expert`` of model layer ``layer`` (one unless experts are redundant)."""
        if self.held:
            return tuple(r for r, got in enumerate(self.held[layer]) if expert in got)
        return (self.expert_owner(layer, expert),)

    def holds(self, rank: int, layer: int, expert: int) -> bool:
        """Whether ``rank`` holds ``expert`` of model layer ``layer``."""
        if self.held:
            return expert in self.held[layer][rank]
        return self.expert_owner(layer, expert) == rank

    def with_held(self, widths: tuple[int, ...], held, redundant: int | None = None) -> "FamilyLayout":
        """Placed experts: ``widths`` slots per rank holding ``held`` (``[layers][tp]`` experts in slot
        order; validated)."""
        rows = tuple(tuple(tuple(int(e) for e in got) for got in row) for row in held)
        red = sum(widths) - self.num_units if redundant is None else redundant
        return msgspec.structs.replace(self, widths=tuple(widths), held=rows, redundant=red)

    def placed(self, expert2rank) -> "FamilyLayout":
        """Same widths, one copy of each expert, placed by ``expert2rank`` (``[layers][experts]`` the rank
        of each; each rank's experts ascending; validated). The contiguous placement is stored as none."""
        rows = tuple(tuple(int(r) for r in row) for row in expert2rank)
        for i, row in enumerate(rows):
            if len(row) != self.num_units:
                raise ValueError(f"experts: placement of layer {i} has {len(row)} entries for {self.num_units} experts")
            bad = sorted({r for r in row if not 0 <= r < self.num_ranks})
            if bad:
                raise ValueError(f"experts: placement of layer {i} names ranks {bad} outside 0..{self.num_ranks - 1}")
        offs = self.unit_offsets()
        contiguous = tuple(r for r in range(self.num_ranks) for _ in range(offs[r], offs[r + 1]))
        if all(row == contiguous for row in rows):
            return msgspec.structs.replace(self, held=(), redundant=0)
        held = [tuple(tuple(e for e, owner in enumerate(row) if owner == r) for r in range(self.num_ranks))
                for row in rows]
        return self.with_held(self.widths, held, 0)

    # ---- attention heads -----------------------------------------------------------------------
    def rank_kv_head_range(self, rank: int) -> tuple[int, int]:
        """KV heads ``[start, end)`` held by ``rank`` (attn only)."""
        self._check_attn()
        return self.rank_unit_range(rank)

    def rank_q_head_range(self, rank: int) -> tuple[int, int]:
        """Query heads ``[start, end)`` held by ``rank`` (attn only; never overlapping between ranks)."""
        self._check_attn()
        if not self.replicated:
            a, b = self.rank_unit_range(rank)
            return (a * self.q_per_kv, b * self.q_per_kv)
        h = self.kv_head_of_rank[rank]
        group = [r for r, hh in enumerate(self.kv_head_of_rank) if hh == h]
        split = [self.q_widths[r] for r in group] if self.q_widths else equal_widths(self.q_per_kv, len(group))
        i = group.index(rank)
        start = h * self.q_per_kv + sum(split[:i])
        return (start, start + split[i])

    def rank_q_heads(self, rank: int) -> int:
        a, b = self.rank_q_head_range(rank)
        return b - a

    def rank_kv_heads(self, rank: int) -> int:
        a, b = self.rank_kv_head_range(rank)
        return b - a

    def kv_replicas(self) -> tuple[int, ...]:
        """``[num_kv_heads]``: how many ranks hold each KV head (all 1 when not replicated)."""
        self._check_attn()
        if not self.replicated:
            return (1,) * self.num_kv_heads
        return tuple(self.kv_head_of_rank.count(h) for h in range(self.num_kv_heads))

    # ---- helpers ---------------------------------------------------------------------------------
    def with_widths(self, widths: tuple[int, ...], kv_head_of_rank: tuple[int, ...] = (),
                    q_widths: tuple[int, ...] = ()) -> "FamilyLayout":
        """Same family, new split (validated)."""
        return msgspec.structs.replace(
            self, widths=tuple(widths), kv_head_of_rank=tuple(kv_head_of_rank), replicated=bool(kv_head_of_rank),
            q_widths=tuple(q_widths), held=(), redundant=0,
        )

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < len(self.widths):
            raise IndexError(f"{self.name}: rank {rank} out of range for tp={len(self.widths)}")

    def _check_attn(self) -> None:
        if self.name != "attn":
            raise ValueError(f"{self.name}: head ranges exist only for the 'attn' family")

    def describe(self) -> str:
        noun = UNIT_NOUNS.get(self.name, "units")
        if self.held:
            extra = f" + {self.redundant} redundant" if self.redundant else ""
            return f"{self.name}: {self.num_units} {noun}{extra} placed per layer, slots {self.widths}"
        if self.replicated:
            return f"{self.name}: {self.num_units} {noun} replicated over {self.num_ranks} ranks {self.kv_head_of_rank}"
        return f"{self.name}: {self.num_units} {noun} x {self.unit_size} -> widths {self.widths}"
