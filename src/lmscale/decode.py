"""Decoding with the whole model's step as one CUDA graph over static buffers.

Eager decoding of a deep model is launch-bound: each layer's step is dozens of small kernels, each
costing host time, so a 24-layer model spends hundreds of µs per layer in Python and the driver.
A CUDA graph records one ``LanguageModel.step`` once and replays all its kernels with one launch.
A graph replays fixed addresses, so the token, every state tensor and the logits live in static
buffers that each step overwrites.

That works only for a state whose *layout* is a fixed point of the step: the same tree of leaves,
every tensor leaf the same shape, dtype and device, every other leaf (an int, None) the same value.
``GraphedStep`` checks this generically with one eager step on a throwaway state and refuses, naming
the layer, what grows (a KV cache) or what changes (a Python position counter, which a graph would
replay as the captured constant). Given a fixed layout, every Python branch of the step that depends
only on shapes and non-tensor values takes the same path on every step, so one capture stands for
all of them; a branch on tensor *values* needs a host sync, which capture rejects loudly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

WARMUP_STEPS = 3  # eager steps before capture: lazy initialisation, cuBLAS/cuDNN handles, Triton compiles
TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def state_leaves(state: Any, path: str = "state") -> list[tuple[str, Any]]:
    """(path, leaf) pairs of a mixer state, depth first: a tensor, tuple/list or dataclass of them.

    Non-tensor leaves (None, ints such as positions) are leaves too, so a layout compares them. The
    path names a leaf in error messages, e.g. ``state.query.max`` or ``state[1]``.
    """
    if isinstance(state, Tensor) or state is None or isinstance(state, (bool, int, float, str)):
        return [(path, state)]
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return [leaf for f in dataclasses.fields(state) for leaf in state_leaves(getattr(state, f.name),
                                                                                 f"{path}.{f.name}")]
    if isinstance(state, (tuple, list)):
        return [leaf for i, part in enumerate(state) for leaf in state_leaves(part, f"{path}[{i}]")]
    raise TypeError(f"{path} is a {type(state).__name__}; decoding states must be tensors, tuples, lists "
                    "or dataclasses of them (plus None and Python numbers)")


def _layout(leaf: Any) -> tuple:
    """What a static buffer must match: a tensor's shape, dtype and device; any other leaf's value."""
    return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device) if isinstance(leaf, Tensor) else ("value", leaf)


def _describe(layout: tuple) -> str:
    if layout[0] == "value":
        return repr(layout[1])
    _, shape, dtype, device = layout
    return f"{list(shape)} {str(dtype).removeprefix('torch.')} on {device}"


def _layer_name(model: nn.Module, i: int) -> str:
    """``'mamba'``, or for a mixer that wraps another (a Based layer) ``'based' (its attention)``."""
    mixer = model.blocks[i].mixer
    name = repr(getattr(mixer, "mixer_name", type(mixer).__name__))
    inner = [getattr(m, "mixer_name", type(m).__name__) for m in mixer.children() if hasattr(m, "init_state")]
    return f"{name} (its {inner[0]})" if inner else name


def _layout_error(model: nn.Module, i: int, path: str, before: tuple, after: tuple, dtype: torch.dtype) -> str:
    """Why layer i's state cannot live in static buffers (layouts before and after a step), and what to do."""
    where = (f"layer {i} ({_layer_name(model, i)}): {path} is {_describe(before)} before a step and "
             f"{_describe(after)} after one")
    if before[0] == "value" or after[0] == "value":
        return (f"{where}: a CUDA graph would replay the value it was captured with on every step. The "
                "mixer must keep it in a tensor of its state to be graphed; until then decode this model "
                "eagerly (LanguageModel.step in a loop)")
    if before[1] != after[1]:
        return (f"{where}: its shape changes from step to step (a KV cache grows with the context), so it "
                "cannot live in the fixed buffers a CUDA graph replays. Decode this model eagerly "
                "(LanguageModel.step in a loop), or use mixers with fixed-size states in every layer")
    return (f"{where}: init_state and step disagree on it. Pass the model's own dtype and device "
            f"(GraphedStep was given dtype={dtype}), or make the mixer's init_state match its step")


def check_fixed_layout(model: nn.Module, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Run one eager step on a throwaway initial state; raise ValueError (see ``_layout_error``) unless
    every layer's state keeps its layout. Returns that step's logits [B, V] (to size the static output)."""
    state = model.init_state(batch_size, device, dtype)
    # layouts taken before the step: a step may update its state in place
    before = [[(path, _layout(leaf)) for path, leaf in state_leaves(layer_state)] for layer_state in state]
    logits, new_state = model.step(torch.zeros(batch_size, dtype=torch.long, device=device), state)
    for i, (old, layer_state) in enumerate(zip(before, new_state, strict=True)):
        new = [(path, _layout(leaf)) for path, leaf in state_leaves(layer_state)]
        if [path for path, _ in new] != [path for path, _ in old]:
            raise ValueError(f"layer {i} ({_layer_name(model, i)}): its state has leaves "
                             f"{[path for path, _ in old]} before a step and {[path for path, _ in new]} after "
                             "one; CUDA-graph decoding needs a fixed state layout. Decode this model eagerly")
        for (path, was), (_, now) in zip(old, new):
            if was != now:
                raise ValueError(_layout_error(model, i, path, was, now, dtype))
    return logits


def static_context_limit(model: nn.Module) -> int | None:
    """The most tokens a sequence may reach: max_seq_len if some layer keeps a static full-context KV
    cache (which would wrap around and overwrite its first positions past that), else None."""
    limits = [m.max_seq_len for m in model.modules()
              if getattr(m, "kv_cache", None) == "static" and getattr(m, "window", None) is None]
    return min(limits) if limits else None


class GraphedStep:
    """``LanguageModel.step`` on static buffers, replayed as one CUDA graph (or run eagerly, same buffers).

    Calling it with one token per sequence, idx_t [B], advances the static state and returns the next
    token's logits [B, V]. That tensor IS the static output buffer: the next call (or ``prefill``)
    overwrites it, so ``.clone()`` it to keep it. Models whose state is not a fixed layout (module
    docstring) are refused with a ValueError naming the layer, the mixer and the leaf.

    graph: None captures a CUDA graph on a CUDA device and runs eagerly elsewhere (so the CPU tests
    exercise all of the buffer logic); True insists on a graph; False is always eager.

    The model must be in eval mode (it is not switched for you: the graph would freeze whichever mode
    it was captured in) and must not change after capture other than in place: the graph reads the
    parameters' current storage, so an optimiser step is seen, but ``model.to(...)`` or replaced
    parameters are not. A graph replays the kernels chosen at capture: build it under the autocast and
    backend settings you decode with. No gradients flow (it runs under ``torch.no_grad``).
    """

    def __init__(self, model: nn.Module, batch_size: int, device: torch.device | str, dtype: torch.dtype,
                 graph: bool | None = None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer (sequences decoded together), got {batch_size!r}")
        if model.training:
            raise ValueError("the model is in training mode; call model.eval() before decoding (GraphedStep "
                             "does not change the caller's model, and a graph would freeze the training-mode "
                             "behaviour, e.g. dropout masks, it was captured with)")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        devices = {p.device for p in model.parameters()}
        if devices != {device}:
            raise ValueError(f"the model's parameters are on {', '.join(map(str, devices))} but decoding was "
                             f"asked for {device}; move the model (model.to(device)) or pass its device")
        if graph and device.type != "cuda":
            raise ValueError(f"graph=True needs a CUDA device, got {device}; graph=None captures on CUDA and "
                             "runs the same static-buffer step eagerly elsewhere")
        self.model, self.batch_size, self.device, self.dtype = model, batch_size, device, dtype
        self.position = 0  # tokens decoded since the last prefill or reset, counted on the host
        self.context_limit = static_context_limit(model)
        with torch.no_grad():
            probe_logits = check_fixed_layout(model, batch_size, device, dtype)
            self._idx = torch.zeros(batch_size, dtype=torch.long, device=device)
            self._state = model.init_state(batch_size, device, dtype)
            self._leaves = [leaf for s in self._state for _, leaf in state_leaves(s) if isinstance(leaf, Tensor)]
            self._storages = {leaf.untyped_storage().data_ptr() for leaf in self._leaves}
            self._logits = torch.empty_like(probe_logits)
            self._warm_up()
            self.reset()  # the warm-up steps must not leak into the decode
            self._graph = self._capture() if graph is not False and device.type == "cuda" else None

    @property
    def graphed(self) -> bool:
        """Whether ``__call__`` replays a CUDA graph (else it runs the step eagerly on the same buffers)."""
        return self._graph is not None

    @property
    def state(self) -> list[Any]:
        """The static per-layer states: live buffers, updated in place by every call; read, don't replace."""
        return self._state

    def __call__(self, idx_t: Tensor) -> Tensor:
        """Feed one token per sequence, idx_t [B]; returns the static logits buffer [B, V] (see class)."""
        if not isinstance(idx_t, Tensor) or idx_t.shape != (self.batch_size,) or idx_t.dtype not in TOKEN_DTYPES:
            got = f"{list(idx_t.shape)} {idx_t.dtype}" if isinstance(idx_t, Tensor) else type(idx_t).__name__
            raise ValueError(f"idx_t must be an integer tensor of token ids of shape [{self.batch_size}] (one "
                             f"per sequence), got {got}")
        self._check_room(self.position + 1, "step")
        self._idx.copy_(idx_t)
        self.position += 1
        if self._graph is not None:
            self._graph.replay()
        else:
            with torch.no_grad():
                self._advance()
        return self._logits

    def prefill(self, idx: Tensor, chunk: int | None = None) -> Tensor:
        """Start new sequences from prompts idx [B, T] (eager ``model.forward``): the static state becomes the
        prompts' final state; returns the static logits buffer [B, V] holding the last position's logits.

        ``chunk`` feeds the prompts that many tokens at a time, each piece continuing from the last one's
        state, so a long prompt needs one chunk's activations rather than the whole prompt's."""
        if not isinstance(idx, Tensor) or idx.ndim != 2 or idx.shape[0] != self.batch_size or idx.shape[1] < 1 \
                or idx.dtype not in TOKEN_DTYPES:
            got = f"{list(idx.shape)} {idx.dtype}" if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"prompts must be an integer tensor [{self.batch_size}, T] with T >= 1, got {got}")
        with torch.no_grad():
            self._check_room(idx.shape[1], "prefill")
            if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
                raise ValueError(f"chunk must be a positive integer (tokens per piece) or None, got {chunk!r}")
            step, state = chunk or idx.shape[1], None
            for start in range(0, idx.shape[1], step):
                logits, state = self.model(idx[:, start:start + step].to(self.device), state, return_state=True,
                                           last_only=True)
            self._load(state, "the prefilled state")
            self._logits.copy_(logits[:, -1])
        self.position = idx.shape[1]
        return self._logits

    def rewind_kv_caches(self, position: int) -> None:
        """Move every full-context static KV cache back to ``position`` (at most the current one); other layers'
        states go on as they are. For benchmarks that decode one window of positions again and again, longer
        than the cache was sized for: the slots past ``position`` are hidden by the mask (they hold later
        positions than the query's) and overwritten by the next steps. Not a way to take back tokens of a
        text: a recurrent state cannot be rewound."""
        if not isinstance(position, int) or isinstance(position, bool) or not 0 <= position <= self.position:
            raise ValueError(f"position must be an integer from 0 to the current position {self.position}, "
                             f"got {position!r}")
        with torch.no_grad():
            for block, state in zip(self.model.blocks, self._state, strict=True):
                if getattr(block.mixer, "kv_cache", None) == "static" and block.mixer.window is None:
                    state.position.fill_(position)
        self.position = position

    def reset(self) -> None:
        """Static state back to ``model.init_state`` (the logits buffer keeps its last value)."""
        with torch.no_grad():
            self._load(self.model.init_state(self.batch_size, self.device, self.dtype), "init_state")
        self.position = 0

    def _check_room(self, tokens: int, what: str) -> None:
        """A preallocated full-context cache (attention's static KV cache) holds max_seq_len positions;
        its step cannot check the device-side position without a host sync, so the host counts here."""
        if self.context_limit is not None and tokens > self.context_limit:
            raise ValueError(f"this {what} would make the context {tokens} tokens, but the model's static KV "
                             f"cache holds max_seq_len = {self.context_limit}; build the model with a larger "
                             "max_seq_len (its cache is preallocated to that size), or reset() for a new sequence")

    def _load(self, state: list[Any], what: str) -> None:
        """Copy ``state`` into the static buffers after checking it has their layout."""
        for i, (static, given) in enumerate(zip(self._state, state, strict=True)):
            for (path, s), (given_path, g) in zip(state_leaves(static), state_leaves(given), strict=True):
                if given_path != path or _layout(s) != _layout(g):
                    raise ValueError(f"layer {i} ({_layer_name(self.model, i)}): {what} has {given_path} = "
                                     f"{_describe(_layout(g))} where the static buffers hold {path} = "
                                     f"{_describe(_layout(s))}")
                if isinstance(s, Tensor):
                    s.copy_(g)

    def _advance(self) -> None:
        """One model step from the static buffers back into them: the body the graph records."""
        logits, new_state = self.model.step(self._idx, self._state)
        new = [leaf for s in new_state for _, leaf in state_leaves(s) if isinstance(leaf, Tensor)]
        writes = []
        for static, leaf in zip(self._leaves, new, strict=True):
            if leaf.data_ptr() == static.data_ptr() and leaf.stride() == static.stride():
                continue  # updated in place (a Triton step kernel): nothing to copy
            if leaf.untyped_storage().data_ptr() in self._storages:
                leaf = leaf.clone()  # a view of another static buffer (a shifted window) would be overwritten
            writes.append((static, leaf))
        for static, leaf in writes:
            static.copy_(leaf)
        self._logits.copy_(logits)

    def _warm_up(self) -> None:
        """A few eager steps, on a side stream on CUDA (as the torch.cuda.graphs docs ask before capture)."""
        if self.device.type != "cuda":
            for _ in range(WARMUP_STEPS):
                self._advance()
            return
        main, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._advance()
        main.wait_stream(side)

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Record ``_advance`` once; capture runs nothing, so the (reset) state is left as it was."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.device), torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
                self._advance()
        except RuntimeError as e:
            raise RuntimeError("capturing LanguageModel.step as a CUDA graph failed: some mixer's step "
                               "synchronises with the host (.item(), a CPU tensor, a branch on a tensor's "
                               "value) or allocates outside PyTorch; graph=False decodes eagerly on the same "
                               f"static buffers. Cause: {e}") from e
        return graph


def greedy_decode(model: nn.Module, prompt: Tensor, n_new: int, graph: bool | None = None) -> Tensor:
    """The n_new most likely next tokens [B, n_new] after prompts [B, T0], one argmax at a time.

    Prefill, then ``GraphedStep`` (a CUDA graph on a GPU unless graph=False): token for token what the
    eager loop ``logits, state = model(prompt, return_state=True)`` then ``model.step`` gives. Builds
    (and captures) a fresh ``GraphedStep``; keep one yourself to decode many prompts of one batch size.
    """
    if not isinstance(n_new, int) or isinstance(n_new, bool) or n_new < 0:
        raise ValueError(f"n_new must be a non-negative integer (tokens to generate), got {n_new!r}")
    if not isinstance(prompt, Tensor) or prompt.ndim != 2:
        raise ValueError(f"prompt must be a [B, T0] tensor of token ids, got "
                         f"{list(prompt.shape) if isinstance(prompt, Tensor) else type(prompt).__name__}")
    weight = next(model.parameters())
    step = GraphedStep(model, prompt.shape[0], weight.device, weight.dtype, graph)
    tokens = torch.empty(prompt.shape[0], n_new, dtype=torch.long, device=weight.device)
    logits = step.prefill(prompt)
    for i in range(n_new):
        tokens[:, i] = logits.argmax(dim=-1)
        if i + 1 < n_new:
            logits = step(tokens[:, i])
    return tokens
