"""Requests across a failover of rank 0: what the tokenizer manager sent, for a new rank 0 to take over.

The process serving rank 0 holds the request intake (its ZMQ socket) and streams outputs. When it
dies, the new rank 0 gets every request the tokenizer manager still waits for, with the output ids
it received and its tokenized input (``_takeover``), and re-submits what no survivor holds.
"""

from __future__ import annotations

import time


class RequestTakeover:
    """Mixed into ``FailoverController``: the record of dispatched requests and the takeover snapshot."""

    def record_dispatch(self, tokenizer, obj) -> None:
        """The tokenizer manager sent ``obj`` to rank 0: keep generate inputs until they finish
        (what a new rank 0 re-submits if the old one died with them queued or half-broadcast)."""
        self.tokenizer = tokenizer
        for o in getattr(obj, "batch", None) or [obj]:
            rid = getattr(o, "rid", None)
            if isinstance(rid, str) and hasattr(o, "input_ids"):
                self.dispatched[rid] = o
                self.accounts.accept(rid)

    def _takeover(self) -> bytes:
        """What the new rank 0 needs when the process serving rank 0 died: every request the
        tokenizer manager still waits for, with the output ids it received (read once the pipes
        from the dead rank drained: two equal snapshots 50 ms apart, at most 1 s) and its input."""
        import pickle

        def snap():
            tm = self.tokenizer
            for _ in range(5):
                try:
                    items = list(tm.rid_to_state.items()) if tm is not None else []
                    return {rid: tuple(st.output_ids) for rid, st in items
                            if not st.finished and getattr(st, "dispatched", True)}
                except RuntimeError:  # resized while copied (another thread): again
                    time.sleep(0.005)
            raise RuntimeError("could not read the tokenizer manager's request states")

        view, deadline = snap(), time.monotonic() + 1.0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            again = snap()
            if again == view:
                break
            view = again
        return pickle.dumps({rid: (list(ids), self.dispatched.get(rid)) for rid, ids in view.items()})

    def forget_finished(self, live_rids) -> None:
        """Drop the record of every request the tokenizer manager no longer tracks (amortized: a
        sweep only once the record doubled since the last one)."""
        if len(self.dispatched) > self._sweep_at:
            for rid in [r for r in self.dispatched if r not in live_rids]:
                self.dispatched.pop(rid, None)
            self._sweep_at = max(64, 2 * len(self.dispatched))

    def first_token_after_fault(self) -> None:
        """Called by the tokenizer hook for every output batch: records TFS of the last recovery."""
        rec = self._pending_tfs
        if rec is not None and rec.tfs_s is None:
            rec.tfs_s = time.monotonic() - rec.t_fault
            self._pending_tfs = None
