"""mtkd's distributed service: Ray actors and gRPC servers around the ``mtkd`` library.

``services`` imports ``mtkd``; ``mtkd`` never imports ``services``, Ray or gRPC.
Subpackages import their heavy dependencies (Ray, gRPC) only when used.
"""
