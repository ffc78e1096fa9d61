"""Prometheus metrics of the failover controller, on SGLang's own ``/metrics`` (``--enable-metrics``).

SGLang serves ``/metrics`` from prometheus_client's multiprocess directory; the metrics below are
created in the server's main process once SGLang has set that directory up (first use, after the
schedulers started), so they appear beside SGLang's. Without ``--enable-metrics`` nothing is created.
"""

import os

__all__ = ["FailoverMetrics"]


class FailoverMetrics:
    def __init__(self) -> None:
        self._m = None

    def _ensure(self):
        if self._m is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import Counter, Gauge, Histogram

            self._m = {
                "recoveries": Counter("sgl_elastic_recoveries_total", "Recoveries after a rank failure, by outcome",
                                      ["outcome"]),
                "phase": Histogram("sgl_elastic_recovery_phase_seconds", "Time spent in each recovery phase",
                                   ["phase"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)),
                "recovery": Histogram("sgl_elastic_recovery_seconds", "Fault seen to serving again",
                                      buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)),
                "tp": Gauge("sgl_elastic_tp_size", "Current tensor-parallel size", multiprocess_mode="mostrecent"),
                "epoch": Gauge("sgl_elastic_epoch", "Current recovery epoch", multiprocess_mode="mostrecent"),
                "resumed": Counter("sgl_elastic_resumed_requests_total", "Requests resumed after a failover"),
                "requests": Gauge("sgl_elastic_requests", "Accepted requests by how they stand (controller.accounting):"
                                  " accepted, finished, errored, in_flight, lost", ["state"],
                                  multiprocess_mode="mostrecent"),
            }
        return self._m

    def serving(self, tp_size: int, epoch: int) -> None:
        m = self._ensure()
        if m is not None:
            m["tp"].set(tp_size)
            m["epoch"].set(epoch)

    def recovery(self, outcome: str, phases_s: dict, recovery_s: float, resumed: int) -> None:
        m = self._ensure()
        if m is None:
            return
        m["recoveries"].labels(outcome=outcome).inc()
        for phase, s in phases_s.items():
            m["phase"].labels(phase=phase).observe(s)
        if outcome == "ok":
            m["recovery"].observe(recovery_s)
            m["resumed"].inc(resumed)

    def requests(self, snap: dict) -> None:
        m = self._ensure()
        if m is None:
            return
        for k in ("accepted", "finished", "errored", "in_flight", "lost"):
            m["requests"].labels(state=k).set(snap[k])
