"""Unit tests of the expert load counter (rank 0's side) and reader (the controller's side)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sgl_elastic.moe import loads as loads_mod
from sgl_elastic.moe.loads import LoadCounter, LoadReader, loads_path

pytestmark = pytest.mark.unit


def test_counts_reach_the_reader_as_loads_since_the_last_mark(tmp_path, monkeypatch):
    monkeypatch.setattr(loads_mod, "FLUSH_S", 0.0)  # every add flushes
    path = loads_path(f"ipc://{tmp_path}/control.sock")
    assert os.path.dirname(path) == str(tmp_path)
    reader = LoadReader(path)
    assert reader.loads() is None  # nothing routed yet
    counter = LoadCounter(path, num_layers=3, num_experts=4)
    counter.add(1, torch.tensor([[0, 2], [2, 3], [-1, 2]]))  # -1: a padded slot, not an expert
    got = reader.loads()
    assert got.tolist() == [[0, 0, 0, 0], [1, 0, 3, 1], [0, 0, 0, 0]]
    reader.mark()
    assert reader.loads().sum() == 0
    counter.add(0, torch.tensor([[3, 3]]))
    assert reader.loads().tolist()[0] == [0, 0, 0, 2] and reader.loads().sum() == 2
    # a new writer (a new rank 0 after a failure) counts from zero: its counts are taken whole
    other = LoadCounter(path, num_layers=3, num_experts=4)
    with np.load(path) as z:
        pid = int(z["pid"])
    other.add(2, torch.tensor([[1]]))
    with open(path, "rb") as f:
        data = dict(np.load(f))
    data["pid"] = np.int64(pid + 1)
    with open(path, "wb") as f:
        np.savez(f, **data)
    assert reader.loads().tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    reader.close()
    assert not os.path.exists(path)


def test_a_gone_run_dir_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(loads_mod, "FLUSH_S", 0.0)
    counter = LoadCounter(str(tmp_path / "gone" / "expert_loads.npz"), 1, 2)
    counter.add(0, torch.tensor([[1]]))  # best effort: nothing raised, nothing left
    assert LoadReader(str(tmp_path / "gone" / "expert_loads.npz")).loads() is None
