"""ElasticLayout: the split of every sharded tensor family of a model over the TP ranks."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import msgspec

from sgl_elastic.layout.family import FAMILY_NAMES, FamilyLayout
from sgl_elastic.layout.model import ModelShape
from sgl_elastic.layout.tensors import TensorSpec, model_tensors
from sgl_elastic.layout.widths import capacity_widths, equal_widths, proportional_widths, validate_widths

__all__ = ["ElasticLayout", "replicated_kv_heads", "POLICIES"]

POLICIES = ("equal", "capacity")

_UNIT_NAMES = {"attn": "kv_head", "mlp": "mlp_block", "moe": "moe_block", "experts": "expert", "vocab": "vocab_block"}


def replicated_kv_heads(num_kv_heads: int, tp_size: int, replicas: Sequence[int] | None = None) -> tuple[int, ...]:
    """``[tp_size]`` KV head of each rank when ``num_kv_heads < tp_size``.

    ``replicas[h]`` ranks hold head h (default: as equal as possible, extra replicas to the lowest
    heads, which is SGLang's ``tp // kv`` when it divides). Groups are contiguous in rank order.
    """
    if replicas is None:
        replicas = equal_widths(tp_size, num_kv_heads)
    if len(replicas) != num_kv_heads or sum(replicas) != tp_size or min(replicas) < 1:
        raise ValueError(
            f"replicas {tuple(replicas)} must give each of {num_kv_heads} KV heads >= 1 rank and sum to tp={tp_size}"
        )
    return tuple(h for h, n in enumerate(replicas) for _ in range(n))


class ElasticLayout(msgspec.Struct, frozen=True, kw_only=True):
    """Per sharded family, the unit and every rank's width in units (offsets derived).

    ``families`` maps a family name ("attn", "mlp", "moe", "experts", "vocab") to its FamilyLayout;
    every family has ``tp_size`` widths. ``model`` carries the shapes needed to name and size the
    tensors (``tensors()``); ``expert_parallel`` says whether experts are sharded whole ("experts")
    or by intermediate columns ("moe").
    """

    tp_size: int
    families: dict[str, FamilyLayout]
    model: ModelShape | None = None
    expert_parallel: bool = False
    policy: str = "equal"

    def __post_init__(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tp_size={self.tp_size} must be >= 1")
        for name, fam in self.families.items():
            if name != fam.name:
                raise ValueError(f"families[{name!r}] holds a layout named {fam.name!r}")
            if fam.num_ranks != self.tp_size:
                raise ValueError(f"{name}: {fam.num_ranks} widths {fam.widths} for tp_size={self.tp_size}")
            if fam.held and self.model is not None and len(fam.held) != self.model.num_layers:
                raise ValueError(f"experts: held has {len(fam.held)} layers, the model {self.model.num_layers}")

    def family(self, name: str) -> FamilyLayout:
        """The FamilyLayout of ``name``; ValueError naming the families this model has otherwise."""
        try:
            return self.families[name]
        except KeyError:
            kind = "unknown family" if name not in FAMILY_NAMES else "this model has no family"
            raise ValueError(f"{kind} {name!r}; this layout has: {', '.join(self.families)}") from None

    def tensors(self) -> tuple[TensorSpec, ...]:
        """Every checkpoint tensor with its sharding (needs ``model``)."""
        if self.model is None:
            raise ValueError("this layout was built without a model shape; use ElasticLayout.from_hf_config")
        return _tensors_cached(self.model, self.expert_parallel)

    def to_bytes(self) -> bytes:
        """msgpack encoding (``from_bytes`` round-trips it)."""
        return msgspec.msgpack.encode(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> "ElasticLayout":
        return msgspec.msgpack.decode(data, type=cls)

    def with_families(self, families: dict[str, FamilyLayout], tp_size: int | None = None) -> "ElasticLayout":
        return msgspec.structs.replace(self, families=families, tp_size=tp_size or self.tp_size)

    def describe(self) -> str:
        return f"tp={self.tp_size}\n" + "\n".join("  " + f.describe() for f in self.families.values())

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(
        cls,
        hf_config: Any,
        tp_size: int,
        *,
        attn_widths: Sequence[int] | None = None,
        policy: str = "equal",
        capacities: Sequence[float] | None = None,
        mlp_unit: int = 64,
        vocab_unit: int = 64,
        expert_parallel: bool = False,
        redundant_experts: int = 0,
    ) -> "ElasticLayout":
        """Build the layout of a HF config on ``tp_size`` ranks, no weights loaded.

        Args:
            attn_widths: KV heads per rank, ``[tp_size]`` (e.g. (3, 3, 2) for 8 KV heads on 3 ranks);
                the other families then follow the same proportions (largest remainder).
            policy: "equal" (floor/ceil, extra units to the lowest ranks) or "capacity"
                (proportional to ``capacities``, one float per rank, e.g. free bytes).
            mlp_unit: intermediate columns per MLP / MoE unit; vocab_unit: vocab rows per unit.
            expert_parallel: shard MoE layers by whole experts ("experts") instead of by
                intermediate columns ("moe").
            redundant_experts: expert parallelism only: this many expert slots beyond one per expert
                (``FamilyLayout.redundant``), split over the ranks like the other families. Until
                the loads place them (at a recovery or a rebalance), every rank holds a contiguous
                block of experts (in proportion to its slots) and, in its other slots, copies of the
                next ranks' first experts (a ring): any one failure loses only the experts of its
                block that its predecessor holds no copy of.
        """
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}; choose one of {POLICIES}")
        if tp_size < 1:
            raise ValueError(f"tp_size={tp_size} must be >= 1")
        if policy == "capacity":
            if capacities is None or len(capacities) != tp_size:
                raise ValueError(
                    f"policy='capacity' needs capacities with one float per rank ({tp_size}), got {capacities}"
                )
        if mlp_unit < 1 or vocab_unit < 1:
            raise ValueError(f"mlp_unit={mlp_unit} and vocab_unit={vocab_unit} must be >= 1")
        model = ModelShape.from_hf_config(hf_config)

        # Step 1: the reference proportions every family follows.
        def widths_for(family: str, num_units: int) -> tuple[int, ...]:
            if attn_widths is not None:
                if family == "attn":
                    return validate_widths(attn_widths, num_units, "attn")
                return proportional_widths(num_units, attn_widths)
            if policy == "capacity":
                return capacity_widths(num_units, capacities)  # type: ignore[arg-type]
            return equal_widths(num_units, tp_size)

        families: dict[str, FamilyLayout] = {}
        # Step 2: attention, replicated when there are fewer KV heads than ranks.
        nq, nkv = model.num_q_heads, model.num_kv_heads
        common = dict(num_q_heads=nq, num_kv_heads=nkv, q_per_kv=nq // nkv)
        if nkv < tp_size:
            if tp_size > nq:
                raise ValueError(f"tp_size={tp_size} exceeds the {nq} query heads; at most {nq} ranks")
            if attn_widths is not None and tuple(attn_widths) != (1,) * tp_size:
                raise ValueError(
                    f"attn_widths {tuple(attn_widths)}: with {nkv} KV heads on {tp_size} ranks the heads are"
                    f" replicated and every rank holds exactly one; pass attn_widths=None"
                )
            families["attn"] = FamilyLayout(
                name="attn", unit_name="kv_head", num_units=nkv, unit_size=1, dim_size=nkv,
                widths=(1,) * tp_size, replicated=True, kv_head_of_rank=replicated_kv_heads(nkv, tp_size), **common,
            )
        else:
            families["attn"] = FamilyLayout(
                name="attn", unit_name="kv_head", num_units=nkv, unit_size=1, dim_size=nkv,
                widths=widths_for("attn", nkv), **common,
            )

        # Step 3: column/row-block families.
        def blocks(name: str, dim_size: int, unit: int) -> FamilyLayout:
            n = -(-dim_size // unit)
            return FamilyLayout(name=name, unit_name=_UNIT_NAMES[name], num_units=n, unit_size=unit,
                                dim_size=dim_size, widths=widths_for(name, n))

        if redundant_experts and not (model.moe_layers and expert_parallel):
            raise ValueError("redundant experts need an MoE model with expert parallelism (--ep-size == --tp)")
        if model.dense_layers:
            families["mlp"] = blocks("mlp", model.intermediate_size, mlp_unit)
        if model.moe_layers:
            if expert_parallel:
                families["experts"] = blocks("experts", model.num_experts, 1)
                if redundant_experts:
                    families["experts"] = _ring(families["experts"], widths_for("experts", model.num_experts
                                                + redundant_experts), model.num_layers, redundant_experts)
            else:
                families["moe"] = blocks("moe", model.moe_intermediate_size, mlp_unit)
        families["vocab"] = blocks("vocab", model.vocab_size, vocab_unit)
        return cls(tp_size=tp_size, families=families, model=model, expert_parallel=expert_parallel, policy=policy)


def _ring(fam: FamilyLayout, slots: tuple[int, ...], num_layers: int, redundant: int) -> FamilyLayout:
    """``fam`` with ``slots`` expert slots per rank: a contiguous block of experts per rank, the other
    slots holding copies of the experts that follow the block (the next ranks' first experts)."""
    E, n = fam.num_units, len(slots)
    if redundant < 0 or max(slots) > E:
        raise ValueError(f"--elastic-redundant-experts {redundant}: give 0..{E * n - E} on {n} ranks ({E} experts;"
                         f" a rank holds each expert at most once), got slots {slots}")
    block = proportional_widths(E, slots)
    row = []
    for r in range(n):
        start = sum(block[:r])
        if block[r] > slots[r]:
            raise ValueError(f"--elastic-redundant-experts {redundant}: slots {slots} cannot hold blocks {block}")
        row.append(tuple((start + i) % E for i in range(slots[r])))
    return fam.with_held(slots, (tuple(row),) * num_layers, redundant)


@functools.lru_cache(maxsize=64)
def _tensors_cached(model: ModelShape, expert_parallel: bool) -> tuple[TensorSpec, ...]:
    return model_tensors(model, expert_parallel=expert_parallel)
