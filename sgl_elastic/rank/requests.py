"""The requests a failover carries from one epoch's scheduler to the next, inside a rank process.

Teardown takes every unfinished request out of the old scheduler as a :class:`ResumeReq` (its
tokenized input, the output ids it generated, its stream offsets); the new rank 0 re-broadcasts
them and every rank re-creates them in its waiting queue as SGLang's retraction does (prompt +
output ids re-prefilled; ``max_new_tokens``, stop conditions and stream offsets unchanged), so the
client sees a pause, not an error and not a repeated token. After rank 0 died, the new rank 0
also aligns them with what the tokenizer manager received and re-submits what no survivor held
(:func:`take_over`).
"""

from __future__ import annotations

from sgl_elastic.controller import reqtrace
from sgl_elastic.rank.session import RANK, log

# Req attributes carried over to the re-created request (everything a client or the detokenizer saw).
_CARRY = ("send_token_offset", "send_decode_id_offset", "send_output_token_logprobs_offset", "decoded_text",
          "surr_offset", "read_offset", "surr_and_decode_ids", "output_token_logprobs_val",
          "output_token_logprobs_idx", "output_top_logprobs_val", "output_top_logprobs_idx",
          "output_token_ids_logprobs_val", "output_token_ids_logprobs_idx", "cached_tokens", "retraction_count",
          "cur_decode_ids_len")


class ResumeReq:
    """An unfinished request carried into a new epoch (picklable: it rides SGLang's broadcast).

    ``delivered``: set when rank 0 died, the output ids the tokenizer manager received; the
    re-created request's stream offsets are aligned to them (see :func:`align`)."""

    __slots__ = ("tokenized", "output_ids", "carry", "delivered")

    def __init__(self, tokenized, output_ids: list[int], carry: dict, delivered: list[int] | None = None) -> None:
        self.tokenized, self.output_ids, self.carry, self.delivered = tokenized, output_ids, carry, delivered


def _requests_of(sched, keep) -> list:
    """Every request ``sched`` holds for which ``keep(req)``, once each, in a deterministic order:
    running, the last batch, the batch being run (a new prefill batch's requests are in no queue
    then), the overlap loop's queued results, the chunked request, then waiting."""
    groups = [getattr(sched.running_batch, "reqs", None) or []]
    for name in ("last_batch", "cur_batch_for_debug"):
        b = getattr(sched, name, None)
        if b is not None:
            groups.append(list(getattr(b, "reqs", None) or []))
    for batch, _result in list(getattr(sched, "result_queue", None) or []):
        groups.append(list(getattr(batch, "reqs", None) or []))
    if getattr(sched, "chunked_req", None) is not None:
        groups.append([sched.chunked_req])
    groups.append(list(sched.waiting_queue))
    seen, out = set(), []
    for g in groups:
        for req in g:
            if req.rid not in seen and keep(req):
                seen.add(req.rid)
                out.append(req)
    return out


def unfinished(sched) -> list:
    """The old scheduler's unfinished requests in a deterministic order (running first, then waiting)."""
    return _requests_of(sched, lambda r: not r.finished())


def flush_finished(sched) -> None:
    """Rank 0: send the final output of the requests the old scheduler finished but never streamed
    (its loop stopped between a request's finish and the batch's output: a collective, or an error,
    in between). They are not resumed (finished), so without this their clients would wait forever."""
    done = _requests_of(sched, lambda r: r.finished() and not getattr(r, "finished_output", True))
    if not done:
        return
    reqtrace.note("flush", [r.rid for r in done])
    try:
        sched.output_streamer.stream_output(done, any(getattr(r, "return_logprob", False) for r in done))
        log(f"sent the final output of {len(done)} request(s) finished but not streamed before the failure:"
            f" {[r.rid for r in done]}")
    except Exception as e:  # noqa: BLE001 - the request audit ends them with an error instead
        log(f"ERROR: could not send the final output of finished requests {[r.rid for r in done]}:"
            f" {type(e).__name__}: {e}")


def resume_record(req) -> ResumeReq | None:
    tok = getattr(req, "_sgle_tokenized", None)
    if tok is None:
        log(f"ERROR: request {req.rid} has no recorded input and cannot be resumed; it ends with an error")
        RANK.unresumable.append(req.rid)
        return None
    carry = {k: getattr(req, k) for k in _CARRY if hasattr(req, k)}
    for k in ("output_token_logprobs_val", "output_token_logprobs_idx", "output_top_logprobs_val",
              "output_top_logprobs_idx", "output_token_ids_logprobs_val", "output_token_ids_logprobs_idx",
              "surr_and_decode_ids"):
        if isinstance(carry.get(k), list):
            carry[k] = list(carry[k])
    return ResumeReq(tok, list(req.output_ids), carry)


def drop_resubmitted(reqs: list) -> list:
    """Rank 0's pull from the tokenizer: drop the copy of a request that was already re-submitted
    after rank 0 died (it sat in the tokenizer's socket queue and is delivered to the new rank 0)."""
    if not RANK.resubmitted or not reqs:
        return reqs
    out = []
    for r in reqs:
        batch = getattr(r, "batch", None)
        if isinstance(batch, list):
            keep = [b for b in batch if getattr(b, "rid", None) not in RANK.resubmitted]
            if len(keep) != len(batch):
                log(f"dropped {len(batch) - len(keep)} re-submitted request(s) delivered again by the socket")
                if not keep:
                    continue
                r.batch = keep
        elif getattr(r, "rid", None) in RANK.resubmitted and hasattr(r, "input_ids"):
            log(f"dropped request {r.rid}: already re-submitted, delivered again by the socket")
            continue
        out.append(r)
    return out


def held_rids(sched) -> list[str]:
    """Every request ``sched`` holds: queued, running, in the batch being run, chunked, waiting for
    its grammar, or about to be re-broadcast (a failover's resumed requests not pulled yet)."""
    rids = {r.rid for r in unfinished(sched)}
    gm = getattr(sched, "grammar_manager", None)
    for q in (getattr(sched, "grammar_queue", None), getattr(gm, "grammar_queue", None)):
        for r in q or []:
            rids.add(getattr(r, "rid", None))
    for r in RANK.inject:
        t = getattr(r, "tokenized", r)
        rids.add(getattr(t, "rid", None))
    rids.discard(None)
    return sorted(rids)


def resume(sched, r: ResumeReq) -> None:
    """Re-create a resumed request in ``sched``'s waiting queue with the output it had (retraction semantics)."""
    sched.handle_generate_request(r.tokenized)
    req = next((q for q in reversed(sched.waiting_queue) if q.rid == r.tokenized.rid), None)
    reqtrace.note("resume", [r.tokenized.rid], queued=req is not None, output=len(r.output_ids), epoch=RANK.epoch)
    if req is None:
        log(f"resumed request {r.tokenized.rid} was not queued by SGLang (rejected); it ends with SGLang's error")
        return
    req.output_ids.extend(r.output_ids)
    for k, v in r.carry.items():
        setattr(req, k, v)
    if r.delivered is not None:
        align(req, r.delivered)
    req.is_retracted = True


def align(req, delivered: list[int]) -> None:
    """Rank 0 died: make ``req``'s stream state match what the tokenizer manager received.

    The dead rank 0 may have been one step ahead of the survivors (it streamed a token they never
    processed) or behind (it died before streaming a step they processed). The client's view wins:
    output ids it saw are kept (a divergent continuation of the survivors is dropped), and every
    offset is set so the next output starts right after the last token delivered: no token twice,
    none missing. Runs the same on every rank (deterministic)."""
    d = len(delivered)
    if list(req.output_ids[:d]) != list(delivered):
        req.output_ids[:] = list(delivered)
    if req.send_token_offset == d and len(req.output_ids) >= d and d > 0:
        return
    req.send_token_offset = d
    req.surr_offset = req.read_offset = None  # incremental detokenization recomputed from scratch
    req.send_decode_id_offset = 0
    if d:
        ids, _ = req.init_incremental_detokenize()
        req.send_decode_id_offset = len(ids) - (len(req.output_ids) - d)
    if getattr(req, "return_logprob", False):
        n = len(getattr(req, "output_token_logprobs_val", None) or [])
        if n < d:
            log(f"request {req.rid}: logprobs of {d - n} delivered token(s) were lost with rank 0")
        req.send_output_token_logprobs_offset = min(n, d)


def take_over(records: list, takeover: bytes) -> tuple[list, int, int]:
    """New rank 0 after rank 0 died: align the survivors' requests with what the tokenizer manager
    received, and re-submit the ones no survivor holds (queued in, or half-broadcast by, the dead
    rank 0). Returns (requests to inject, resubmitted, dropped)."""
    import pickle

    live: dict = pickle.loads(takeover)
    out, dropped = [], 0
    for r in records:
        if r.tokenized.rid not in live:
            dropped += 1  # finished (or aborted) as far as the client is concerned
            continue
        r.delivered = list(live[r.tokenized.rid][0])
        out.append(r)
    held = {r.tokenized.rid for r in out}
    resub = 0
    for rid, (delivered, tokenized) in live.items():
        if rid in held:
            continue
        if tokenized is None:
            log(f"ERROR: request {rid} was lost with rank 0 and has no recorded input; it ends with an error")
            RANK.unresumable.append(rid)
            continue
        out.append(ResumeReq(tokenized, list(delivered), {}, list(delivered)) if delivered else tokenized)
        resub += 1
    RANK.resubmitted = {rid for rid in live if rid not in held}
    reqtrace.note("takeover", sorted(RANK.resubmitted), kept=sorted(held), dropped=dropped)
    return out, resub, dropped

