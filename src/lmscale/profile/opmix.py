"""Operation mix of one decode step: how many operations of each kind a token costs, by tracing.

Chips built for low power differ most in what they do badly. Neuromorphic cores (Loihi 2, SpiNNaker 2)
and dataflow chips (NorthPole) do multiply–accumulates, element-wise products and additions in
hardware, and exponentials, logarithms, divisions, square roots and normalisations slowly, in
microcode or on a host. The analytic cost models (``Mixer.step_cost``) count matmul FLOPs only, so
the mix comes from running the step under PyTorch's dispatcher: every aten operation is put in one of
the kinds below with its element count. The analytic multiply–accumulates are checked against the
traced ones (``tests/test_opmix.py``). An operation this module does not know is reported in
``uncounted`` rather than dropped, so a new mixer cannot hide work from the table.

Counts are per token at batch 1, of the step's mathematics as its PyTorch form writes it (a fused
kernel does the same operations in fewer launches).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

KINDS = ("mac", "multiply", "add", "nonlinear", "compare")
KIND_MEANING = {
    "mac": "multiply–accumulates of matrix products (and convolutions)",
    "multiply": "element-wise products (gates, decays, scales)",
    "add": "element-wise additions, subtractions and sums",
    "nonlinear": "exp, log, division, square root, sigmoid-type functions, softmax",
    "compare": "max, clamp, ReLU, select: comparisons",
}

_MULTIPLY = {"mul", "square", "addcmul", "lerp", "cumprod", "linalg_vector_norm"}
_ADD = {"add", "sub", "rsub", "sum", "mean", "cumsum", "neg", "addcmul", "lerp", "linalg_vector_norm", "var_mean",
        "var", "nansum"}
_NONLINEAR = {"exp", "exp2", "expm1", "log", "log1p", "log2", "sigmoid", "silu", "softplus", "tanh", "gelu", "erf",
              "div", "reciprocal", "rsqrt", "sqrt", "pow", "_softmax", "_log_softmax", "logsumexp", "elu",
              "sin", "cos", "logsigmoid", "log_sigmoid_forward", "_safe_softmax"}
_COMPARE = {"relu", "clamp", "clamp_min", "clamp_max", "maximum", "minimum", "max", "min", "amax", "amin", "where",
            "gt", "lt", "ge", "le", "eq", "ne", "masked_fill", "abs", "sign", "argmax", "topk", "logical_and",
            "logical_or", "logical_not", "bitwise_and", "bitwise_not", "bitwise_or", "isnan", "isinf", "sort"}
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "linear"}
# moving, viewing or making data: no arithmetic
_MEMORY = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "clone", "copy",
           "_to_copy", "cat", "stack", "index_select", "embedding", "slice", "select", "unsqueeze", "squeeze",
           "zeros", "zeros_like", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "fill",
           "zero", "detach", "index_copy", "split", "split_with_sizes", "chunk",
           "alias", "new_zeros", "new_ones", "ones", "ones_like", "full", "full_like", "arange", "unbind", "flip",
           "roll", "narrow", "as_strided", "lift_fresh", "lift_fresh_copy", "scalar_tensor", "index", "gather",
           "repeat", "tril", "triu", "_unsafe_index", "constant_pad_nd", "pad", "unfold", "contiguous",
           "select_scatter", "slice_scatter", "scatter", "index_put", "masked_select", "diagonal",
           "_local_scalar_dense", "item", "set", "resize",
           "view_as_real", "view_as_complex", "_reshape_alias", "expand_as", "flatten",
           "unflatten", "tensor_split", "broadcast_to", "_conj", "conj", "resolve_conj", "resolve_neg", "movedim",
           "repeat_interleave", "new_full", "_index_put_impl", "rand", "randn", "randint", "normal", "uniform",
           "bernoulli", "to", "type_as", "split_copy", "squeeze_copy", "unsqueeze_copy", "view_copy", "promote_types", "complex"}


def _numel(x: Any) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else 0


def _matmul_macs(name: str, args: tuple, out: torch.Tensor) -> int:
    """m·n·k of a product: its output's elements times the length of the summed dimension."""
    if name in ("mm", "bmm", "mv", "dot"):
        a = args[0]
    elif name in ("addmm", "baddbmm", "addbmm", "addmv"):
        a = args[1]
    else:  # linear(x, W, b)
        a = args[0]
    inner = a.shape[-1]
    if name == "addbmm":
        return out.numel() * inner * a.shape[0]
    return max(out.numel(), 1) * inner


def _sdpa_counts(args: tuple) -> Counter:
    """Attention as its arithmetic: q·kᵀ and p·v products, one exp per score, one division per output."""
    q, k, v = args[:3]
    batch = math.prod(q.shape[:-2])
    scores = batch * q.shape[-2] * k.shape[-2]
    return Counter(mac=scores * (q.shape[-1] + v.shape[-1]), multiply=scores, add=scores,
                   nonlinear=scores + batch * q.shape[-2] * v.shape[-1], compare=scores)


def _conv_macs(args: tuple, out: torch.Tensor) -> int:
    weight = args[1]  # [out channels, in channels per group, *kernel]
    return out.numel() * (weight.shape[1] * math.prod(weight.shape[2:]))  # in-channels per group × kernel


class OpCounter(TorchDispatchMode):
    """Counts operations by kind for the part of the model that is running (``part``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, Counter] = {}
        self.uncounted: Counter = Counter()
        self.part = "other"
        self.muted = 0  # inside an operation already counted whole

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.muted:
            return out
        name = func.overloadpacket.__name__
        name = name.removesuffix("_")  # an in-place op counts as its out-of-place twin
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        counts = self.counts.setdefault(self.part, Counter())
        if name in _MEMORY:
            return out
        if name in _MATMUL:
            counts["mac"] += _matmul_macs(name, args, first)
            if name.startswith("add") or (name == "linear" and len(args) > 2 and args[2] is not None):
                counts["add"] += _numel(first)
            return out
        if name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                    "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
                    "scaled_dot_product_attention", "_scaled_dot_product_attention_math"):
            counts.update(_sdpa_counts(args))
            return out
        if name in ("convolution", "_convolution", "conv1d", "cudnn_convolution", "mkldnn_convolution"):
            counts["mac"] += _conv_macs(args, first)
            return out
        if name == "rotary_phases":  # lmscale's RoPE table: angle = position·frequency, then cos and sin
            counts.update(multiply=_numel(first), nonlinear=2 * _numel(first))
            return out
        if name == "polar":  # r·(cos θ + i sin θ)
            counts.update(multiply=2 * _numel(first), nonlinear=2 * _numel(first))
            return out
        if name in ("_fused_rms_norm", "native_layer_norm", "rms_norm", "layer_norm", "native_group_norm"):
            groups = args[6] if name == "native_group_norm" else None
            rows = (args[0].shape[0] * groups if groups else _numel(first) // max(first.shape[-1], 1))
            counts.update(multiply=3 * _numel(first), add=_numel(first), nonlinear=rows)  # x², x·r·w; Σ; one rsqrt a row
            return out
        known = False
        # reductions count their input's elements, element-wise operations their output's
        size = max(_numel(first), _numel(args[0]) if args else 0)
        for kind, names in (("multiply", _MULTIPLY), ("add", _ADD), ("nonlinear", _NONLINEAR),
                            ("compare", _COMPARE)):
            if name in names:
                counts[kind] += size
                known = True
        if name in ("_softmax", "_log_softmax", "_safe_softmax", "logsumexp"):
            counts["add"] += size  # the row sums
        if not known:
            self.uncounted[name] += 1
        return out


class _WholeAttention(TorchFunctionMode):
    """Counts ``scaled_dot_product_attention`` as one operation, before the dispatcher sees how a backend
    decomposes it (the math backend, used on the meta device, scales all of K instead of the scores)."""

    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.counter.counts.setdefault(self.counter.part, Counter()).update(_sdpa_counts(args))
        self.counter.muted += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.muted -= 1


@contextmanager
def _attributed(model: torch.nn.Module, counter: OpCounter) -> Iterator[None]:
    """While tracing ``model.step``, operations inside each block's ``mixer.step`` count as "mixer"."""
    originals = []
    for block in model.blocks:
        mixer = block.mixer
        original = mixer.step

        def step(x_t, state, _original=original):
            outer, counter.part = counter.part, "mixer"
            try:
                return _original(x_t, state)
            finally:
                counter.part = outer

        mixer.step = step
        originals.append(mixer)
    try:
        yield
    finally:
        for mixer in originals:
            del mixer.step  # the instance attribute goes; the class's method shows again


@torch.no_grad()
def trace_step(model: torch.nn.Module, context_len: int, *, seed: int = 0) -> dict[str, Any]:
    """Operations of one decode step at batch 1 after ``context_len`` tokens of context.

    Returns ``{"mixer": {kind: count}, "rest": {...}, "uncounted": {op: calls}}``: "mixer" sums every
    layer's mixer step, "rest" is the embedding, norms, MLPs and head.
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    device = next(model.parameters()).device
    if context_len > 0:
        prompt = torch.randint(vocab, (1, context_len), generator=generator).to(device)
        _, state = model(prompt, return_state=True, last_only=True)
    else:
        state = model.init_state(1, device, next(model.parameters()).dtype)
    token = torch.randint(vocab, (1,), generator=generator).to(device)
    counter = OpCounter()
    with _attributed(model, counter), counter, _WholeAttention(counter):
        model.step(token, state)
    return {"mixer": {k: int(counter.counts.get("mixer", {}).get(k, 0)) for k in KINDS},
            "rest": {k: int(counter.counts.get("other", {}).get(k, 0)) for k in KINDS},
            "uncounted": dict(counter.uncounted)}


def op_mix_table(preset_name: str, context_len: int = 2048, mixers: list[str] | None = None,
                 dtype: torch.dtype = torch.bfloat16, trace: bool = True):
    """One row per mixer: the traced operations of a decode step per token (mixers, and the whole model),
    the analytic multiply–accumulates beside them, and the bytes a chip must hold and move.

    Models are built on PyTorch's meta device, so any preset costs shapes, not memory or time.
    ``state_traffic_bytes`` is what the cost model says a step reads and writes of the state (its
    ``step_cost`` bytes less the weights and the token's input and output). ``trace=False`` gives the
    bytes alone (the counts are left empty), in a fraction of the time.
    """
    import pandas as pd

    from lmscale.mixers import available
    from lmscale.model import LanguageModel
    from lmscale.presets import preset

    rows = []
    for name in mixers or available():
        cfg = preset(preset_name, name, max_seq_len=context_len + 1)
        with torch.device("meta"):
            model = LanguageModel(cfg)
        traced = trace_step(model, context_len) if trace else {
            "mixer": dict.fromkeys(KINDS, math.nan), "rest": dict.fromkeys(KINDS, math.nan), "uncounted": {}}
        io_bytes = 2 * cfg.d_model * dtype.itemsize
        steps = [block.mixer.step_cost(context_len, dtype) for block in model.blocks]
        row = {"mixer": name, "preset": preset_name, "context_len": context_len, "dtype": str(dtype).removeprefix("torch."),
               **{f"mixer_{k}": v for k, v in traced["mixer"].items()},
               **{f"model_{k}": traced["mixer"][k] + traced["rest"][k] for k in KINDS},
               "mixer_mac_analytic": sum(c.flops for c in steps) / 2,
               "n_layers": cfg.n_layers,
               "weight_bytes": sum(p.numel() for p in model.parameters()) * dtype.itemsize,
               "embedding_bytes": model.embed.weight.numel() * dtype.itemsize,
               "mixer_weight_bytes": sum(b.mixer.weight_bytes(dtype) for b in model.blocks),
               "state_bytes": sum(b.mixer.state_bytes(context_len, dtype) for b in model.blocks),
               "state_traffic_bytes": sum(c.bytes - b.mixer.weight_bytes(dtype) - io_bytes
                                          for c, b in zip(steps, model.blocks, strict=True)),
               "uncounted": ", ".join(f"{op}×{n}" for op, n in sorted(traced["uncounted"].items()))}
        mixer_ops = sum(traced["mixer"].values())
        row["mixer_nonlinear_share"] = traced["mixer"]["nonlinear"] / mixer_ops if mixer_ops else math.nan
        rows.append(row)
    return pd.DataFrame(rows)
