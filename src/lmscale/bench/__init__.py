"""Benchmarks that write result records, checked before they are timed.

``lmscale bench kernels`` (``lmscale.bench.kernels``) times the GPU kernels of ``lmscale.ops.triton``
against the PyTorch forms and the peers (flash-linear-attention, PyTorch SDPA); ``lmscale.bench.timing``
is how anything here is timed. This package imports nothing heavy, so the CLI can list the ops.
"""

# the kernel suite's ops, in the order a full run measures them (the matmul/copy ceilings first)
KERNEL_OPS = ("ceiling", "gla", "simple_gla", "linear_attention", "delta_rule", "gated_delta_rule",
              "cumulative_softmax", "windowed_softmax", "lru_scan", "selective_scan", "step", "model_step", "mixer_layer")
