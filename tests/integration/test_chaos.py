"""Chaos: seeded random faults from outside a real server under a steady mix of clients.

The default tier runs one short seed (5 events) of the hardest configuration: tiny Mixtral with
``--ep-size 4 --elastic-redundant-experts 4 --elastic-eplb-interval 4``, float32, tp 4. ``slow`` adds
a 5-event seed of tiny Qwen3-MoE (MoE TP) and three 10-event seeds per family
(``scripts/test.sh -m slow -k chaos``).
What one run checks: ``sgl_elastic.testing.chaos`` (every answer equal to the same server's before
the faults, none failed, none lost — the client's view and the server's request audit — the
request accounts add up, the end state, nothing left after Ctrl-C). A failing seed prints its
events; ``python bench/chaos.py --family F [--ep] --first S --seeds 1 --events N`` reruns it.
"""

import pytest

from sgl_elastic.testing.chaos import ChaosConfig, run_chaos

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

CASES = [pytest.param("qwen3-moe", False, 1, 5, id="qwen3moe-seed1", marks=pytest.mark.slow),
         pytest.param("mixtral", True, 1, 5, id="mixtral-ep-redundant-seed1")]
CASES += [pytest.param(f, ep, s, 10, id=f"{f}{'-ep' if ep else ''}-seed{s}", marks=pytest.mark.slow)
          for f, ep in (("qwen3-moe", False), ("mixtral", True)) for s in (2, 3, 4)]


@pytest.mark.parametrize("family,ep,seed,events", CASES)
def test_chaos(tiny_models, tmp_path, family, ep, seed, events):
    res = run_chaos(ChaosConfig(str(tiny_models[family]), seed, events, expert_parallel=ep,
                                log_path=str(tmp_path / "server.log")))
    assert res.passed, (f"chaos seed {seed} ({family}{' ep' if ep else ''}, {events} events) failed; server log"
                        f" {tmp_path / 'server.log'}:\n{res.describe()}")
