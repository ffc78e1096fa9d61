"""Fault injection for tests, read in one place: every ``SGLE_TEST_*`` variable and what it does.

Production code asks this module (``faults.delay_s``, ``faults.injected``, ``faults.hold_dispatch_dir``,
``faults.raise_dir``, ``faults.drop_prefix``) instead of reading the environment itself; with none of
the variables set every answer is "no fault". Each process reads the environment once, at first use.

- ``SGLE_TEST_DELAYS`` ("phase=seconds,..."; like SGLang's ``SGLANG_TEST_CRASH_*``): the controller
  stays that long in each named recovery phase; "rebuild=seconds": survivors wait that long before
  building their new scheduler. So a test can kill a second rank inside a given phase.
- ``SGLE_TEST_FAIL`` ("fault,..."): "rebuild": in the server's first recovery (epoch 1) every
  surviving rank's in-place rebuild raises (it reports RankFailed; the recovery fails with
  "survivors could not rebuild" and falls back to restarting every scheduler; later epochs rebuild
  normally). "fallback": the fallback restart itself raises (the server ends in state ``failed``).
- ``SGLE_TEST_HOLD_DISPATCH`` (a directory): EP rank 0 holds its first layer-0 MoE dispatch after
  ``<dir>/arm`` appears (routing done, experts not yet run): it removes ``arm``, writes
  ``<dir>/held`` (its map epoch) and waits until ``<dir>/release`` exists (at most 60 s). So a test
  can fail a rank between routing and dispatch.
- ``SGLE_TEST_RAISE`` (a directory): a rank whose ``<dir>/raise-<tp rank>`` exists removes it and
  raises a RuntimeError in its event loop (a device error that does not kill the process).
- ``SGLE_TEST_DROP`` (a rid prefix): every rank drops, unprocessed, each request whose rid starts
  with it (a request lost inside the server, which the request audit must find and end).
"""

from __future__ import annotations

import functools
import os

__all__ = ["ENV_TEST_DELAYS", "ENV_TEST_FAIL", "ENV_TEST_HOLD_DISPATCH", "ENV_TEST_RAISE", "ENV_TEST_DROP",
           "parse_delays", "parse_faults", "delay_s", "injected", "hold_dispatch_dir", "raise_dir", "drop_prefix"]

ENV_TEST_DELAYS = "SGLE_TEST_DELAYS"
ENV_TEST_FAIL = "SGLE_TEST_FAIL"
ENV_TEST_HOLD_DISPATCH = "SGLE_TEST_HOLD_DISPATCH"
ENV_TEST_RAISE = "SGLE_TEST_RAISE"
ENV_TEST_DROP = "SGLE_TEST_DROP"


def parse_delays(spec: str | None) -> dict[str, float]:
    """``"frozen=2,rebuild=0.5"`` -> ``{"frozen": 2.0, "rebuild": 0.5}`` (a bad number raises)."""
    out = {}
    for item in filter(None, (spec or "").split(",")):
        name, _, secs = item.partition("=")
        out[name.strip()] = float(secs)
    return out


def parse_faults(spec: str | None) -> frozenset[str]:
    """The names in an ``SGLE_TEST_FAIL`` value."""
    return frozenset(filter(None, (x.strip() for x in (spec or "").split(","))))


@functools.cache
def _delays() -> dict[str, float]:
    return parse_delays(os.environ.get(ENV_TEST_DELAYS))


@functools.cache
def _faults() -> frozenset[str]:
    return parse_faults(os.environ.get(ENV_TEST_FAIL))


def delay_s(name: str) -> float:
    """Seconds to wait at ``name`` (a recovery phase's value, or "rebuild"); 0.0: none."""
    return _delays().get(name, 0.0)


def injected(name: str) -> bool:
    """Whether the fault ``name`` ("rebuild", "fallback") is injected."""
    return name in _faults()


def hold_dispatch_dir() -> str | None:
    return os.environ.get(ENV_TEST_HOLD_DISPATCH) or None


def raise_dir() -> str | None:
    return os.environ.get(ENV_TEST_RAISE) or None


def drop_prefix() -> str | None:
    return os.environ.get(ENV_TEST_DROP) or None
