"""The controller: what runs in the server's main process to keep the TP ranks alive.

Today: the scheduler restart (``supervisor``), the ownership of the server's state daemon
(``daemon``), and the process / shared-memory / port helpers they need (``procs``). Imports no
SGLang at package level; the patches' main-process hooks call into it, never the reverse.
"""
