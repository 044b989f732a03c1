"""mtkd's distributed service: Ray actors and gRPC servers around the ``mtkd`` library.

``services`` imports ``mtkd``; ``mtkd`` never imports ``services``, Ray or gRPC.
Subpackages import their heavy dependencies (Ray, gRPC) only when used.
"""
import os

# Ray's C++ core logs a harmless error about Ray Train's preemption watcher in every run
# (ray-project/ray#53727). Ray reads this filter of the lines it forwards to the driver when it is
# imported, hence here, before anything in this package imports Ray; the line stays in Ray's logs.
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "PreemptionWatcher")
