"""Exec: how tasks run. vmap, the loop, threads, compile, chunks, the ``auto`` trial and the memory
probe, and the optional compiled CPU kernels (``exec.kernels``). It runs per-task functions over a
TaskBatch and knows no algorithm or task family."""
