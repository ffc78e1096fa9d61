"""What runs inside one TP rank process (an SGLang scheduler) besides SGLang itself.

- :mod:`~sgl_elastic.rank.state`: the elastic layout active in the process (read at plugin load);
- :mod:`~sgl_elastic.rank.daemon_link`: the state daemon seen from the rank (weights bound as
  views of its shards, the KV pool, the prefix index);
- :mod:`~sgl_elastic.rank.session`: the one object that owns the rank's failover state;
- :mod:`~sgl_elastic.rank.failover`: in-place failover (teardown, orders, rebuild, resume);
- :mod:`~sgl_elastic.rank.requests`: the requests a failover carries into the next epoch;
- :mod:`~sgl_elastic.rank.signals`: what the controller and the rank tell each other through files
  (heartbeat, regroup, request audit).

The SGLang hooks that call these live in ``patches/`` (one module per patched SGLang module);
this package patches nothing. Importing it imports neither torch nor sglang.
"""
