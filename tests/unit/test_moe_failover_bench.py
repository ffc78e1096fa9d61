"""Pure parts of ``bench/moe_failover.py``: windowed throughput, TFS / peak / TTP on synthetic
timelines, arrivals, the cut-JSON salvage and the ShareGPT sampling (bench_serving's sampler on a
small file written here). No servers."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import moe_failover as mf  # noqa: E402

pytestmark = pytest.mark.unit


def test_windowed_throughput_bins_tokens_per_second():
    events = [(0.1, 2), (1.9, 2), (2.0, 4), (5.99, 1), (6.5, 100)]  # the last one is past t_end
    tok = mf.windowed_throughput(events, t_end=6.0, window_s=2.0)
    assert tok.tolist() == [2.0, 2.0, 0.5]
    assert mf.windowed_throughput([], t_end=0.5, window_s=2.0).tolist() == [0.0]
    with pytest.raises(ValueError, match="window_s"):
        mf.windowed_throughput(events, 6.0, 0.0)


def test_first_success_ignores_tokens_in_transit():
    assert mf.first_success_after([1.0, 10.01, 10.2, 12.0], t_fault=10.0) == 10.2
    assert mf.first_success_after([1.0, 9.0], t_fault=10.0) is None


def _timeline(window_s: float, levels: list[tuple[float, float, float]]) -> np.ndarray:
    """Synthetic windowed throughput: (from_s, to_s, tok/s) segments."""
    end = max(b for _, b, _ in levels)
    tok = np.zeros(int(np.ceil(end / window_s)))
    for a, b, v in levels:
        tok[int(a // window_s):int(b // window_s)] = v
    return tok


def test_recovery_metrics_on_a_synthetic_failover():
    # 20 tok/s until the fault at 40 s, nothing until 50 s, a ramp 50..60 s, then 15 tok/s until 120 s.
    w = 2.0
    tok = _timeline(w, [(2, 40, 20), (50, 54, 5), (54, 58, 12), (58, 60, 13), (60, 120, 15)])
    r = mf.recovery_metrics(tok, w, t_fault=40.0, t_first_success=50.3, t_load_end=110.0)
    assert r.tfs_s == pytest.approx(10.3)
    assert r.throughput_before == 20.0
    assert r.throughput_after == 15.0  # median of the later half of the windows in [52, 110)
    # first window ending after 50.3 at >= 13.5 tok/s: [60, 62) -> TTP = 62 - 40 (from the fault)
    assert r.t_peak_reached == 62.0
    assert r.ttp_s == pytest.approx(22.0) and r.ttp_s >= r.tfs_s
    assert not r.peak_on_drain
    # a lower threshold is reached earlier: [54, 56) at 12 >= 0.8 * 15
    assert mf.recovery_metrics(tok, w, 40.0, 50.3, 110.0, peak_frac=0.8).ttp_s == pytest.approx(16.0)


def test_recovery_metrics_edge_cases():
    w = 1.0
    tok = _timeline(w, [(0, 10, 8), (30, 31, 80)])
    # nothing after the fault
    r = mf.recovery_metrics(tok[:10], w, t_fault=5.0, t_first_success=None, t_load_end=9.0)
    assert (r.tfs_s, r.ttp_s, r.throughput_after) == (None, None, None)
    assert r.throughput_before == 8.0  # windows [1, 5): the ramp-up window [0, 1) is skipped
    # the load ended before the first success: the peak is the drain of the backlog
    r = mf.recovery_metrics(tok, w, t_fault=5.0, t_first_success=30.2, t_load_end=12.0)
    assert r.peak_on_drain and r.throughput_after == 80.0
    assert r.tfs_s == pytest.approx(25.2) and r.ttp_s == pytest.approx(26.0)
    # an immediate recovery at full speed: the peak at the end of the first window after the success
    tok = _timeline(w, [(0, 20, 10)])
    r = mf.recovery_metrics(tok, w, t_fault=5.0, t_first_success=5.0, t_load_end=20.0)
    assert r.tfs_s == 0.0 and r.throughput_after == 10.0 and r.ttp_s == pytest.approx(1.0)


def test_arrivals_seeded_poisson_and_fixed():
    a = mf.arrival_times(2000, 4.0, "poisson", seed=1)
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    assert np.diff(a).mean() == pytest.approx(0.25, rel=0.1)
    assert np.array_equal(a, mf.arrival_times(2000, 4.0, "poisson", seed=1))
    assert not np.array_equal(a, mf.arrival_times(2000, 4.0, "poisson", seed=2))
    assert mf.arrival_times(3, 2.0, "fixed", 0).tolist() == [0.0, 0.5, 1.0]
    assert mf.arrival_times(3, float("inf"), "poisson", 0).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="poisson or fixed"):
        mf.arrival_times(3, 1.0, "burst", 0)


def _conversations(n: int) -> list[dict]:
    return [{"id": f"c{i}", "conversations": [
        {"from": "human", "value": "tell me about the number " + "x " * (i % 7 + 2) + str(i)},
        {"from": "gpt", "value": "it is a number " * (i % 5 + 1)}]} for i in range(n)]


def test_salvage_keeps_the_complete_conversations_of_a_cut_file(tmp_path):
    full = json.dumps(_conversations(5), indent=2)
    cut = full[: full.index('"c4"') + 10]  # in the middle of the last element
    src = tmp_path / "cut.json"
    src.write_text(cut)
    fixed = mf.sharegpt_file(str(src), tmp_path / "cache")
    assert fixed != src and [c["id"] for c in json.loads(fixed.read_text())] == ["c0", "c1", "c2", "c3"]
    assert mf.sharegpt_file(str(src), tmp_path / "cache") == fixed  # cached
    good = tmp_path / "good.json"
    good.write_text(full)
    assert mf.sharegpt_file(str(good), tmp_path / "cache") == good
    with pytest.raises(mf.DatasetMissing, match="not a file"):
        mf.sharegpt_file(str(tmp_path / "nope.json"), tmp_path / "cache")


class _WordTokenizer:
    """Stand-in tokenizer: one token per whitespace-separated word."""

    def encode(self, text: str) -> list[int]:
        return [hash(w) % 1000 for w in text.split()]


def test_sampling_uses_bench_serving_and_returns_the_expected_fields(tmp_path):
    src = tmp_path / "sharegpt.json"
    src.write_text(json.dumps(_conversations(50) + [{"id": "one-turn", "conversations": [
        {"from": "human", "value": "alone"}]}]))
    rows = mf.sample_requests(src, 10, _WordTokenizer(), seed=3, output_len=8, context_len=None)
    assert len(rows) == 10
    for r in rows:
        assert isinstance(r.prompt, str) and r.prompt.startswith("tell me")
        assert r.prompt_len == len(r.prompt.split()) and r.output_len == 8
    again = mf.sample_requests(src, 10, _WordTokenizer(), seed=3, output_len=8, context_len=None)
    assert [r.prompt for r in again] == [r.prompt for r in rows]  # seeded
    # the answer's length when no output length is fixed; the context filter drops long pairs
    rows = mf.sample_requests(src, 50, _WordTokenizer(), seed=3, output_len=None, context_len=12)
    assert rows and all(r.prompt_len + r.output_len <= 12 for r in rows)
    with pytest.raises(mf.DatasetMissing, match="fits"):
        mf.sample_requests(src, 5, _WordTokenizer(), seed=3, output_len=8, context_len=4)


def test_ratios_and_table_per_degradation():
    rows = [
        {"mode": "elastic", "degradation": "4->3", "fail_at": 0.25, "tfs_s": 2.0, "ttp_s": 4.0},
        {"mode": "restart", "degradation": "4->3", "fail_at": 0.25, "tfs_s": 40.0, "ttp_s": 10.0},
        {"mode": "elastic", "degradation": "4->2", "fail_at": 0.25, "tfs_s": 4.0, "ttp_s": 8.0},
        {"mode": "restart", "degradation": "4->2", "fail_at": 0.25, "tfs_s": 40.0, "ttp_s": 10.0},
        {"mode": "elastic-noeplb", "degradation": "4->2", "fail_at": 0.25, "error": "boom"},
    ]
    r = mf.ratios(rows)
    assert r["4->3@0.25"] == {"tfs_restart_over_elastic": 20.0, "ttp_change_pct": -60.0}
    assert r["4->2@0.25"] == {"tfs_restart_over_elastic": 10.0, "ttp_change_pct": -20.0}
    text = mf.table(rows)
    assert "tp 4->3, fault at 25 %: TFS restart/elastic 20.0x, TTP elastic vs restart -60 %" in text.replace("25%", "25 %")
    assert "10.0x" in text and "error: boom" in text
    # rows without a degradation (older summaries) keep the plain key
    assert "0.5" in mf.ratios([{"mode": "elastic", "fail_at": 0.5, "tfs_s": 1.0},
                               {"mode": "restart", "fail_at": 0.5, "tfs_s": 30.0}])


def test_degradations_plan_and_killed_ranks():
    assert [str(d) for d in mf.parse_degradations("4->3, 4->2,8->6")] == ["4->3", "4->2", "8->6"]
    for bad in ("4-3", "3->3", "2->0", "a->b", ""):
        with pytest.raises(ValueError):
            mf.parse_degradations(bad)
    d = mf.Degradation(4, 2)
    assert mf.fail_ranks(d, 1) == [1, 2] and mf.fail_ranks(d, 3) == [3, 0] and mf.fail_ranks(d, 0) == [0, 1]
    a = mf.parse_args(["--degradations", "4->3,4->2", "--modes", "elastic,restart,no-failure"])
    plan = [(m, str(d), fa) for m, d, fa in mf.run_plan(a)]
    assert plan.count(("no-failure", "4->3", None)) == 1 and not any(m == "no-failure" and d == "4->2"
                                                                       for m, d, _ in plan)
    assert len(plan) == 2 * 2 * 2 + 1  # (elastic, restart) x 2 degradations x 2 failure points + 1 reference
    assert [fa for _, _, fa in mf._no_failure_rows(a, mf.Degradation(4, 3))] == [0.25, 0.5, 0.25, 0.5]
    assert mf._server_flags("elastic-noeplb", [], 3, True)[-3:] == ["--no-elastic-eplb", "--ep-size", "3"]
    assert "--no-elastic-daemon" in mf._server_flags("restart", [], 2, False)


def test_args_presets_and_validation():
    a = mf.parse_args(["--preset", "cpu"])
    assert (a.family, a.size, a.tp, a.num_requests) == ("qwen3-moe", "bench", 3, mf.PRESETS["cpu"]["num_requests"])
    assert [str(d) for d in a.degradations] == ["3->2"]
    a = mf.parse_args(["--preset", "cpu-load"])
    assert [str(d) for d in a.degradations] == ["4->3", "4->2"] and a.output_len == 32 and a.request_rate == 2.0
    assert [str(d) for d in mf.parse_args(["--preset", "cpu-load", "--tp", "3"]).degradations] == ["3->2"]
    a = mf.parse_args(["--preset", "gpu", "--model-path", "/m"])
    assert [str(d) for d in a.degradations] == ["8->7", "8->6"] and a.ep and a.num_requests == 1000
    assert mf.parse_args(["--preset", "cpu", "--num-requests", "7"]).num_requests == 7
    a = mf.parse_args([])
    assert (a.num_requests, a.fail_at, a.window_s, a.modes) == (1000, [0.25, 0.5], 2.0,
                                                                 ["elastic", "restart", "no-failure"])
    assert mf.parse_args(["--fail-rank", "0"]).fail_rank == 0  # rank 0 can be killed
    for bad in (["--tp", "1"], ["--fail-at", "1.5"], ["--modes", "elastic,nope"], ["--fail-rank", "3"],
                ["--degradations", "4->4"], ["--degradations", "4->2,2->1", "--fail-rank", "2"]):
        with pytest.raises(SystemExit):
            mf.parse_args(bad)
