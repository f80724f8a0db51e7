"""Exec: how tasks run. vmap, the loop, threads, compile, chunks, the ``auto`` trial and the memory
probe, and the optional compiled CPU kernels (``exec.kernels``). It runs per-task functions over a
TaskBatch and knows no algorithm or task family."""

from mamlkit.engine import functional
from mamlkit.exec.kernels import fusion

# The executor installs the fast path: under a kernels mode, functional.call runs a Sequential of built-in
# layers as its layer list with fused blocks. Done on import of any part of exec, kernels included.
functional.set_module_view(fusion.fused)
