# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Alternatives to self-attention with a constant-size state
#
# This chapter reviews the sequence mixers the report compares. For each family it gives the
# **recurrence** (how one token updates a state and reads from it — the form used to decode), the
# **parallel** form (all positions at once, quadratic in the length $T$ — the form that is easy to
# check) and the **chunkwise** form (parallel inside chunks of $C$ tokens, recurrent across them —
# the form used to train). Each derivation is followed by the library call that implements it and by
# an assertion, executed when the book is built, that the forms agree on fresh random inputs. The
# chapter is the library explained; nothing here is re-implemented.
#
# Notation: a layer maps $x_1, \dots, x_T \in \mathbb{R}^{d}$ to $y_1, \dots, y_T$; per head,
# $q_t, k_t \in \mathbb{R}^{d_k}$ and $v_t \in \mathbb{R}^{d_v}$ are linear projections of $x_t$. Every
# mixer is causal: $y_t$ depends on $x_{\le t}$ only. Tensors are laid out `[B, H, T, D]`.

# %%
import math

import altair as alt
import pandas as pd
import torch
from IPython.display import Markdown, display

from lmscale import plots
from lmscale.config import ModelConfig
from lmscale.mixers import build_mixer
from lmscale.ops.gated_recurrence import (
    chunk_gated_recurrence,
    gated_recurrence_step,
    naive_gated_recurrence,
    parallel_gated_recurrence,
)

plots.setup()
torch.manual_seed(0)


def close(a, b, tol=1e-10):
    """Relative agreement in float64, the check every section ends with."""
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# %% [markdown]
# ## Softmax attention: a state that grows
#
# Causal softmax attention {cite:p}`vaswani2017attention`, in the Transformer++ arrangement used by
# LLaMA {cite:p}`touvron2023llama` (RMSNorm, SwiGLU, rotary positions {cite:p}`su2021roformer`), computes
#
# $$
# y_t = \sum_{s \le t} \frac{\exp(q_t^\top k_s / \sqrt{d_k})}{\sum_{s' \le t} \exp(q_t^\top k_{s'} / \sqrt{d_k})}\, v_s ,
# \qquad Y = \operatorname{softmax}\!\big(QK^\top/\sqrt{d_k} + M\big) V ,
# $$
#
# with $M$ the causal mask ($0$ on and below the diagonal, $-\infty$ above). Read as a recurrence,
# its state is the **key–value cache** $\{(k_s, v_s)\}_{s \le t}$: decoding token $t$ appends one pair
# and reads all $t$ of them, so memory and work per token grow as $O(t)$. Grouped-query attention
# {cite:p}`ainslie2023gqa` shares keys and values between groups of heads, shrinking the cache by the
# group size; a sliding window of $w$ tokens {cite:p}`beltagy2020longformer` bounds it at $w$.
#
# The check: a forward pass over a prefix, then token-by-token decoding from the returned cache,
# reproduces the forward pass over the whole sequence.

# %%
def prefix_then_step_equals_full(name, options=None, T=24, prefix=10, layer_idx=0):
    cfg = ModelConfig(mixer=name, d_model=32, n_heads=4, n_layers=6, max_seq_len=128, mixer_options=options or {})
    mixer = build_mixer(cfg, layer_idx).double()
    x = randn(2, T, 32)
    y, state = mixer(x[:, :prefix], return_state=True)
    ys = [y]
    for t in range(prefix, T):
        y_t, state = mixer.step(x[:, t], state)
        ys.append(y_t.unsqueeze(1))
    return close(torch.cat(ys, dim=1), mixer(x))


assert prefix_then_step_equals_full("attention")
assert prefix_then_step_equals_full("attention", {"n_kv_heads": 2, "window": 8})

# %% [markdown]
# ## Linear attention: the kernel trick turns attention into a recurrence
#
# Replacing $\exp(q^\top k)$ by a kernel $\phi(q)^\top \phi(k)$ with a feature map $\phi$
# {cite:p}`katharopoulos2020transformers` lets the sum over $s$ be regrouped:
#
# $$
# y_t = \frac{\phi(q_t)^\top \sum_{s\le t} \phi(k_s) v_s^\top}{\phi(q_t)^\top \sum_{s \le t} \phi(k_s)}
#     = \frac{S_t^\top \phi(q_t)}{z_t^\top \phi(q_t)}, \qquad
# S_t = S_{t-1} + \phi(k_t) v_t^\top, \quad z_t = z_{t-1} + \phi(k_t).
# $$
#
# The state $S_t \in \mathbb{R}^{d_k \times d_v}$ has a fixed size: decoding costs $O(d_k d_v)$ per
# token whatever the context. The same model also has a parallel form, $Y = (\phi(Q)\phi(K)^\top \odot L)V$
# with $L$ the lower-triangular matrix of ones, which is what attention-style training computes —
# at quadratic cost. Linear attention read this way is a fast-weight programme that writes $v_t$ under
# key $k_t$ into the matrix $S$ {cite:p}`schlag2021linear`.

# %% [markdown]
# ## Gated linear recurrences: one equation, many models
#
# Adding a decay to the state gives the recurrence that most recent models share:
#
# $$
# S_t = \operatorname{diag}(g_t)\, S_{t-1} + k_t v_t^\top, \qquad o_t = S_t^\top q_t ,
# \qquad g_t \in (0, 1]^{d_k}.
# $$
#
# - $g_t = 1$: linear attention {cite:p}`katharopoulos2020transformers`;
# - $g_t = \gamma_h$, a fixed decay per head: RetNet's retention {cite:p}`sun2023retnet`;
# - $g_t = \alpha_t \mathbf{1}$, one data-dependent scalar per head and token: Mamba-2's state-space
#   duality {cite:p}`dao2024mamba2` ("simple GLA");
# - $g_t = \sigma(W_2 W_1 x_t + b)^{1/\tau}$ per key channel: Gated Linear Attention
#   {cite:p}`yang2024gla`.
#
# **Parallel form.** Unrolling, $o_t = \sum_{s \le t} \big(q_t \odot \prod_{r=s+1}^{t} g_r\big)^\top k_s \; v_s$.
# With cumulative log gates $b_t = \sum_{r \le t} \log g_r$ the product is $\exp(b_t - b_s)$, so
#
# $$
# O = \big( (Q \odot e^{B}) (K \odot e^{-B})^\top \odot L \big) V
# $$
#
# — but $e^{-B}$ overflows as soon as the gates have decayed far (for $b_s = -100$,
# $e^{100}$ is out of range in bfloat16 and float32 alike). The library's parallel form therefore
# builds $\exp(b_t - b_s)$ pairwise and masks before exponentiating, so every exponent is $\le 0$.
#
# **Chunkwise form.** Split $T$ into chunks of $C$ tokens and write $b$ relative to each chunk's start.
# Inside a chunk the parallel form applies ($C^2$ pairs); across chunks only the $d_k \times d_v$ state
# is passed: the chunk $n$ adds $\sum_{s \in n} (k_s \odot e^{b_{\text{end}} - b_s}) v_s^\top$ to the
# decayed entering state, and position $t$ reads the entering state through $q_t \odot e^{b_t}$. The
# cost is $O(T C (d_k + d_v) + T d_k d_v)$ — linear in $T$ and made of matrix products, which is why
# it trains fast {cite:p}`yang2024gla`.
#
# The three forms, called with a per-channel gate, an initial state and a length that is not a
# multiple of the chunk:

# %%
B, H, T, DK, DV = 2, 3, 45, 16, 32
q, k, v = randn(B, H, T, DK), randn(B, H, T, DK), randn(B, H, T, DV)
log_g = torch.nn.functional.logsigmoid(randn(B, H, T, DK) + 2)  # gates in (0, 1)
s0 = randn(B, H, DK, DV)

o_naive, s_naive = naive_gated_recurrence(q, k, v, log_g, initial_state=s0, output_final_state=True)
o_par, s_par = parallel_gated_recurrence(q, k, v, log_g, initial_state=s0, output_final_state=True)
o_chunk, s_chunk = chunk_gated_recurrence(q, k, v, log_g, initial_state=s0, output_final_state=True, chunk_size=16)
assert close(o_par, o_naive) and close(o_chunk, o_naive)
assert close(s_par, s_naive) and close(s_chunk, s_naive)

# the recurrence, one token at a time, is the decoding step
state, outs = s0, []
for t in range(T):
    o_t, state = gated_recurrence_step(q[:, :, t], k[:, :, t], v[:, :, t], log_g[:, :, t], state)
    outs.append(o_t)
assert close(torch.stack(outs, dim=2), o_naive) and close(state, s_naive)

# a scalar gate per head (RetNet, Mamba-2) and no gate at all (linear attention) use the same op
for gate in (log_g[..., 0], None):
    ref, _ = naive_gated_recurrence(q, k, v, gate)
    assert close(chunk_gated_recurrence(q, k, v, gate, chunk_size=16)[0], ref)
    assert close(parallel_gated_recurrence(q, k, v, gate)[0], ref)

# %% [markdown]
# The mixers built on this op differ in their projections, gates and normalisation, not in the
# recurrence. Each is checked at the layer level too: prefix, then decoding, equals the whole.

# %%
for name in ("linear_attention", "retnet", "simple_gla", "gla"):
    assert prefix_then_step_equals_full(name), name

# %% [markdown]
# ## The delta rule: writing by correction
#
# The additive write $S_t = S_{t-1} + k_t v_t^\top$ piles new associations on old ones, so a state of
# $d_k$ rows retrieves badly once more than $d_k$ keys are stored. The delta rule
# {cite:p}`schlag2021linear` first reads what the state currently returns for $k_t$ and writes only the
# correction:
#
# $$
# S_t = S_{t-1} + \beta_t k_t \big(v_t - S_{t-1}^\top k_t\big)^\top
#     = \big(I - \beta_t k_t k_t^\top\big) S_{t-1} + \beta_t k_t v_t^\top ,
# \qquad o_t = S_t^\top q_t ,
# $$
#
# one step of online least squares with learning rate $\beta_t = \sigma(w_\beta^\top x_t)$ and
# L2-normalised keys (so the transition has eigenvalues in $[-1, 1]$ and the recurrence is stable).
# Gated DeltaNet {cite:p}`yang2024gateddeltanet` multiplies the transition by a data-dependent decay
# $\alpha_t \in (0, 1]$, combining forgetting with correction.
#
# **Chunkwise form.** The transitions are no longer diagonal, so the gated-recurrence trick does not
# apply. DeltaNet's parallelisation {cite:p}`yang2024deltanet` writes the product of $C$ Householder-like
# transitions in the compact WY form $\prod_{i}(I - \beta_i k_i k_i^\top) = I - W^\top K$: within a
# chunk, $W = T \operatorname{diag}(\beta) K$ and $U = T \operatorname{diag}(\beta) V$ with
# $T = \big(I + \operatorname{tril}(\operatorname{diag}(\beta) K K^\top, -1)\big)^{-1}$, obtained by
# forward substitution (the "UT transform"). The chunk then acts on the entering state as
# $S \mapsto S + K^\top (U - W S)$ — matrix products again, and only a $C \times C$ triangular solve per
# chunk is sequential.

# %%
from lmscale.ops.delta_rule import chunk_delta_rule, delta_rule_step, naive_delta_rule

B, H, T, DK, DV = 2, 2, 45, 16, 16
q, k, v = randn(B, H, T, DK), torch.nn.functional.normalize(randn(B, H, T, DK), dim=-1), randn(B, H, T, DV)
beta, log_alpha = torch.sigmoid(randn(B, H, T)), torch.nn.functional.logsigmoid(randn(B, H, T) + 3)
s0 = randn(B, H, DK, DV)
for gate in (None, log_alpha):
    ref, ref_final = naive_delta_rule(q, k, v, beta, gate, initial_state=s0, output_final_state=True)
    o, final = chunk_delta_rule(q, k, v, beta, gate, initial_state=s0, output_final_state=True, chunk_size=16)
    assert close(o, ref) and close(final, ref_final)

# writing the same key twice replaces the value instead of summing (β = 1, unit key)
state = torch.zeros(1, 1, DK, DV, dtype=torch.float64)
key, first, second = k[:1, :1, 0], v[:1, :1, 0], v[:1, :1, 1]
one = torch.ones(1, 1, dtype=torch.float64)
_, state = delta_rule_step(key, key, first, one, None, state, scale=1.0)
recalled, state = delta_rule_step(key, key, second, one, None, state, scale=1.0)
assert close(recalled, second)

for name in ("deltanet", "gated_deltanet"):
    assert prefix_then_step_equals_full(name), name

# %% [markdown]
# ## Based and Just-read-twice: spending state where recall needs it
#
# Zoology {cite:p}`arora2023zoology` showed that associative recall separates these models: a
# fixed-size state must decide what to keep before it knows what will be asked. Based
# {cite:p}`arora2024based` combines two cheap mechanisms with complementary strengths. Linear attention
# with the **second-order Taylor feature map** $\phi(x) = [1, x, \operatorname{vec}(x x^\top)/\sqrt 2]$ on a
# small projection ($d_k = 16$) gives $\phi(q)^\top\phi(k) = 1 + q^\top k + (q^\top k)^2/2 \approx
# \exp(q^\top k)$ — a softmax-like kernel whose state ($1 + 16 + 256$ rows) is tunable through the
# feature dimension; **sliding-window softmax attention** over 64 tokens gives exact local
# retrieval; short gated convolutions (BaseConv) fill the remaining layers. The model mixes these layer
# kinds in a fixed pattern by depth.
#
# Just-read-twice {cite:p}`arora2024jrt` attacks the ordering problem directly. *JRT-Prompt* repeats the
# context before the question, so the second reading happens with the whole context already seen.
# *JRT-RNN* encodes a prefix of $M$ tokens **non-causally** — every prefix token is written into the
# state before any output reads it — and decodes causally after it: $o_t = \phi(q_t)^\top(E + D_t)$ with
# $E = \sum_{s < M} \phi(k^e_s) v^{e\top}_s$ from separate encoder projections.

# %%
from lmscale.data.jrt_prompt import jrt_prompt
from lmscale.mixers.based import taylor_feature_map

x1, x2 = randn(5, 16), randn(5, 16)
s = (x1 * x2).sum(-1) / 4  # qᵀk / √16
assert close((taylor_feature_map(x1) * taylor_feature_map(x2)).sum(-1), 1 + s + s**2 / 2)

context, question = [464, 3797, 318, 319, 262, 2603, 13], [383, 3797]
assert jrt_prompt(context, question) == context + [198] + context + question

for layer_idx in range(3):  # Based's three layer kinds: gated convolution, Taylor linear attention, window
    assert prefix_then_step_equals_full("based", layer_idx=layer_idx), layer_idx
assert prefix_then_step_equals_full("jrt")

# %% [markdown]
# ## Diagonal state-space models: LRU and Mamba
#
# A second family keeps a vector state per channel and updates it elementwise:
#
# $$
# h_t = a_t \odot h_{t-1} + b_t .
# $$
#
# **LRU** {cite:p}`orvieto2023lru` makes $a_t = \lambda$ a constant *complex* diagonal,
# $\lambda = \exp(-e^{\nu} + i e^{\theta})$, so that $|\lambda| < 1$ for any parameters (the recurrence
# cannot blow up), initialised on a ring $r_{\min} \le |\lambda| \le r_{\max}$ close to the unit circle;
# the input is $b_t = \gamma \odot B x_t$ with $\gamma = \sqrt{1 - |\lambda|^2}$, so the state keeps the
# scale of its input as $|\lambda| \to 1$, and the output is $y_t = \operatorname{Re}(C h_t) + D \odot x_t$.
#
# **Mamba** {cite:p}`gu2023mamba` makes the recurrence *selective*: a step size $\Delta_t$ and the
# matrices $B_t, C_t$ are functions of the input, $A = -\exp(A_{\log})$ is diagonal and the continuous
# system is discretised by a zero-order hold, $\bar A_t = \exp(\Delta_t A)$, $\bar B_t x_t \approx
# \Delta_t B_t x_t$; each of the $d_{\text{inner}}$ channels carries an $N$-dimensional state,
# $h_t = \bar A_t \odot h_{t-1} + \bar B_t x_t$, read as $y_t = C_t^\top h_t + D x_t$ and gated by
# $\operatorname{SiLU}(z_t)$. A short causal convolution precedes the scan; its window is part of the
# decoding state.
#
# **Parallel form.** The map $(a, b) \mapsto h$ is a prefix computation with the associative operator
# $(a_1, b_1) \bullet (a_2, b_2) = (a_1 a_2,\; a_2 b_1 + b_2)$, so it runs in $\lceil \log_2 T \rceil$
# elementwise passes {cite:p}`blelloch1990prefix`. **Chunkwise form.** Inside a chunk, $h_t = \sum_{s}
# \big(\prod_{r=s+1}^{t} a_r\big) b_s + \big(\prod_{r \le t} a_r\big) h_{\text{enter}}$, with the products
# built as cumulative products (which can only underflow, never overflow, as $|a| \le 1$); the state is
# passed between chunks. Unlike the gated linear recurrences above, none of these forms contains a
# matrix product: the scan is elementwise work, which is what limits Mamba-1's training throughput on
# matrix engines and what Mamba-2 changed {cite:p}`dao2024mamba2`.

# %%
from lmscale.ops.diagonal_scan import chunk_diagonal_scan, naive_diagonal_scan, parallel_diagonal_scan

# real, input-dependent decays (Mamba's layout: [B, T, channels, state])
a = torch.exp(-torch.rand(2, 37, 8, 4, dtype=torch.float64))
b = randn(2, 37, 8, 4)
h0 = randn(2, 8, 4)
ref, ref_final = naive_diagonal_scan(a, b, initial_state=h0, output_final_state=True)
for form in (parallel_diagonal_scan, lambda *args, **kw: chunk_diagonal_scan(*args, chunk_size=8, **kw)):
    h, final = form(a, b, initial_state=h0, output_final_state=True)
    assert close(h, ref) and close(final, ref_final)

# complex, time-invariant λ on a ring near the unit circle (LRU's layout: [B, T, N], λ broadcast)
radius = torch.empty(16, dtype=torch.float64).uniform_(0.9, 0.999)
lam = radius * torch.exp(1j * torch.empty(16, dtype=torch.float64).uniform_(0, 2 * math.pi))
bc = torch.complex(randn(2, 50, 16), randn(2, 50, 16))
ref, _ = naive_diagonal_scan(lam, bc)
assert close(parallel_diagonal_scan(lam, bc)[0], ref) and close(chunk_diagonal_scan(lam, bc, chunk_size=16)[0], ref)

for name in ("lru", "mamba"):
    assert prefix_then_step_equals_full(name), name

# %% [markdown]
# ## Additive attention: Fastformer and LEAP
#
# Fastformer {cite:p}`wu2021fastformer` replaces pairwise scores by *additive* attention: one scalar
# "focus" logit per token, $\ell_t = w^\top x_t / \sqrt{d}$, and a softmax over tokens that summarises the
# sequence into a single vector. LEAP {cite:p}`hu2022leap` makes this causal with cumulative
# softmax-weighted sums,
#
# $$
# \bar v_t = \frac{\sum_{s \le t} e^{\ell_s} v_s}{\sum_{s \le t} e^{\ell_s}}
#          = \frac{S_t}{z_t}, \qquad S_t = S_{t-1} + e^{\ell_t} v_t, \quad z_t = z_{t-1} + e^{\ell_t},
# $$
#
# used twice in the Fastformer arrangement: a running summary of the queries modulates each key, a
# running summary of those keys modulates each value. The state is two running sums per head — $O(d)$,
# smaller than a linear-attention matrix state.
#
# **Stability.** Written as LEAP writes it, $\sum_s e^{\ell_s}$ overflows as soon as one logit exceeds
# about 88 in float32 (and much less in bfloat16). The library carries a running maximum
# $m_t = \max_{s \le t} \ell_s$ and sums rescaled by $e^{m_{t-1} - m_t}$, so no exponent is positive.
#
# **Windows in $O(T)$.** LEAP limits layer $l$ to the last $k_l = 4 \cdot 2^{l}$ tokens (the last layer
# global) and obtains windowed sums as differences of cumulative sums, $S_t - S_{t-k}$ — linear in $T$
# whatever $k$. In floating point that difference cancels catastrophically when one large term leaves
# the window (one logit of 20 leaving a window of 8 already gives $0/0$ in float32), and a running
# maximum cannot decrease again. The library keeps the $O(T)$ cost without subtracting: it cuts the
# sequence into blocks of $k$ tokens, so that every window is a suffix of the previous block joined to
# a prefix of the current one, both computed by running (maximum-stabilised) scans — the van Herk /
# Gil–Werman construction for sliding-window maxima {cite:p}`vanherk1992fast`, applied to log-sum-exp
# pairs. Decoding a windowed layer needs the current block's terms and the previous block's suffix
# aggregates: $O(k\,d)$ per head, growing with the window but never with the context.

# %%
from lmscale.ops.cumulative_softmax import (
    chunk_cumulative_softmax,
    naive_cumulative_softmax,
    parallel_cumulative_softmax,
)

logits, values = randn(2, 3, 53) * 3, randn(2, 3, 53, 16)
for window in (None, 1, 5, 24):
    ref, _ = naive_cumulative_softmax(logits, values, window=window)
    assert close(parallel_cumulative_softmax(logits, values, window=window)[0], ref), window
    assert close(chunk_cumulative_softmax(logits, values, window=window)[0], ref), window

# 65,536 tokens in bfloat16 with logits drifting up to 300: the raw exp-cumsum is inf, ours is finite
drift = (torch.linspace(0, 300, 65536) + torch.randn(65536)).view(1, 1, -1).to(torch.bfloat16)
long_v = torch.randn(1, 1, 65536, 8, dtype=torch.bfloat16)
assert torch.isinf(drift.float().exp().cumsum(-1)).any()
assert torch.isfinite(chunk_cumulative_softmax(drift, long_v)[0]).all()
assert torch.isfinite(chunk_cumulative_softmax(drift, long_v, window=1024)[0]).all()

assert prefix_then_step_equals_full("leap")

# %% [markdown]
# ## Segment recurrences: Transformer-XL and Infini-attention
#
# Two designs keep softmax attention but bound its state by cutting the sequence into segments of $N$
# tokens. **Transformer-XL** {cite:p}`dai2019transformerxl` lets a query in segment $s$ attend causally
# within $s$ and to all of segment $s-1$, whose keys and values are cached and, in training, detached:
# decoding holds at most $2N - 1$ positions. (The library gives it relative positions through RoPE rather
# than the paper's sinusoids with bias vectors.) **Infini-attention** {cite:p}`munkhdalai2024infini` adds
# to local attention within the segment a compressive memory of every earlier segment, read by linear
# attention with $\sigma = \mathrm{ELU} + 1$ and mixed by a learned gate $g_h = \operatorname{sigmoid}(\beta_h)$:
#
# $$
# A = g \odot \frac{\sigma(q)^\top M_{s-1}}{\sigma(q)^\top z_{s-1}} + (1 - g) \odot A_{\text{local}}, \qquad
# M_s = M_{s-1} + \sigma(K_s)^\top \Big(V_s - \frac{\sigma(K_s) M_{s-1}}{\sigma(K_s) z_{s-1}}\Big),
# $$
#
# the delta-rule update (the linear one drops the subtraction). Both run segment by segment from any
# state, and decoding one token at a time gives the same outputs:

# %%
for name in ("transformer_xl", "infini_attention"):
    assert prefix_then_step_equals_full(name, {"segment_len": 5}), name

# %% [markdown]
# ## Other recurrences in the literature
#
# Several well-known families are close relatives of the mixers above. In the shared notation (state
# $S_t \in \mathbb{R}^{d_k \times d_v}$ per head unless said otherwise), and with what the library has
# of each:
#
# - **RWKV-4** {cite:p}`peng2023rwkv`: per channel, a decayed weighted average of the values,
#   $a_t = e^{-w} a_{t-1} + e^{k_t} v_t$, $b_t = e^{-w} b_{t-1} + e^{k_t}$, read as
#   $(a_{t-1} + e^{u + k_t} v_t) / (b_{t-1} + e^{u + k_t})$ and gated by $\sigma(r_t)$: a vector state
#   (two numbers per channel) with a fixed decay and a bonus $u$ for the current token. *Not implemented.*
# - **RWKV-5 and RWKV-6** {cite:p}`peng2024eagle`: matrix-valued states,
#   $S_t = \operatorname{diag}(w_t) S_{t-1} + k_t v_t^\top$, read as
#   $o_t = (S_{t-1} + \operatorname{diag}(u)\, k_t v_t^\top)^\top r_t$, with a fixed per-channel decay in
#   RWKV-5 and a data-dependent one in RWKV-6: GLA's recurrence (`gla`) plus the bonus term, which the
#   library does not have. *Not implemented as such.*
# - **RWKV-7** {cite:p}`peng2025rwkv7`: a generalised delta rule,
#   $S_t = \big(\operatorname{diag}(w_t) - (a_t \odot \hat\kappa_t)\, \hat\kappa_t^\top\big) S_{t-1} + k_t v_t^\top$,
#   with a per-channel decay and in-context learning rate. The library's `gated_deltanet` is the case of a
#   scalar decay and a scalar rate per head. *Not implemented in general.*
# - **S4** {cite:p}`gu2022s4`: a linear time-invariant state space per channel,
#   $h_t = \bar A h_{t-1} + \bar B x_t$, $y_t = C h_t + D x_t$ with $h_t \in \mathbb{R}^{N}$; being time-invariant,
#   it trains as one long convolution. Its diagonal, data-dependent descendant is Mamba (`mamba`). *S4 itself
#   is not implemented.*
# - **H3** {cite:p}`fu2023h3`: $y = q \odot \mathrm{SSM}_{\text{diag}}\big(\mathrm{SSM}_{\text{shift}}(k) \odot v\big)$, linear
#   attention with state-space filters in place of the running sum. *Not implemented.*
# - **Hyena** {cite:p}`poli2023hyena`: long implicit convolutions interleaved with element-wise gates. Its
#   filters span the whole context, so decoding has no fixed-size state unless the filters are distilled
#   into a recurrence. *Not implemented.*
# - **Hawk and Griffin** {cite:p}`de2024griffin`: the RG-LRU, a diagonal vector recurrence
#   $h_t = a_t \odot h_{t-1} + \sqrt{1 - a_t^2} \odot (i_t \odot x_t)$ with a data-dependent decay
#   $a_t = \sigma(\Lambda)^{c\, r_t}$: the LRU (`lru`) with Mamba-style input-dependent decay and a real,
#   not complex, state. Griffin interleaves it with local (sliding-window) attention, which the library
#   expresses as a hybrid. *The RG-LRU is not implemented.*
# - **xLSTM** {cite:p}`beck2024xlstm`: the mLSTM is $C_t = f_t C_{t-1} + i_t v_t k_t^\top$ with a normaliser
#   $n_t = f_t n_{t-1} + i_t k_t$, read as $C_t q_t / \max(|n_t^\top q_t|, 1)$, with an exponential input
#   gate: a scalar-gated linear recurrence (`simple_gla`'s equation) plus a normaliser state. The sLSTM
#   keeps scalar memories with hidden-to-hidden connections, so it cannot be trained in parallel over time.
#   *Neither is implemented.*
# - **Mamba-2** {cite:p}`dao2024mamba2`: its state-space duality is the scalar-gated recurrence above, and
#   the library implements it as `simple_gla`.
#
# Where each would sit in the cost table: its decode state per layer, at the width of the table below
# ($d = 768$, 12 heads of 64; $N = 16$ state dimensions for the state-space models).

# %%
d, heads, head_dim, n_state = 768, 12, 64, 16
relatives = pd.DataFrame([
    ("RWKV-4", 2 * d, "per channel: numerator and denominator", "—"),
    ("RWKV-5/6", heads * head_dim * head_dim, "per head: d_k × d_v", "gla (without the bonus)"),
    ("RWKV-7", heads * head_dim * head_dim, "per head: d_k × d_v", "gated_deltanet (scalar decay and rate)"),
    ("S4", d * n_state, "per channel: N", "mamba (its selective descendant)"),
    ("H3", d * n_state, "per channel: N (diagonal SSM)", "—"),
    ("Hyena", None, "grows with the context", "—"),
    ("Hawk / Griffin (RG-LRU)", d, "per channel: 1", "lru (complex, fixed decay)"),
    ("xLSTM (mLSTM)", heads * (head_dim * head_dim + head_dim), "per head: d_k × d_v + d_k", "simple_gla (no normaliser)"),
], columns=["family", "state values per layer", "shape", "closest mixer here"])
plots.table(relatives, "literature-relatives", formats={"state values per layer": "{:,.0f}"})

# %% [markdown]
# ## Hybrids
#
# Nothing forces one mixer per model. Jamba {cite:p}`lieber2024jamba` interleaves one attention layer
# with seven Mamba layers; Based is itself a fixed mix of layer kinds. In the library a hybrid is a
# config: `layers` lists the mixer of every layer, or `attention_every=N` makes every $N$-th layer
# attention. Each layer keeps its own state — a KV cache for attention layers, a fixed-size state for
# the others — and the model decodes through all of them.

# %%
from lmscale.model import LanguageModel

hybrid_cfg = ModelConfig(mixer="gla", attention_every=4, n_layers=8, vocab_size=97, d_model=32, n_heads=4,
                         max_seq_len=64)
assert [hybrid_cfg.mixer_for_layer(i) for i in range(8)] == ["gla", "gla", "gla", "attention"] * 2
hybrid = LanguageModel(hybrid_cfg).double()
tokens = torch.randint(0, 97, (2, 20))


def decodes_as_it_runs(model: LanguageModel, prefix: int = 12) -> bool:
    """A prefill of ``prefix`` tokens, then one step per token: the logits of one parallel forward."""
    logits, state = model(tokens[:, :prefix], return_state=True)
    stepped = [logits]
    for t in range(prefix, tokens.shape[1]):
        step_logits, state = model.step(tokens[:, t], state)
        stepped.append(step_logits.unsqueeze(1))
    return close(torch.cat(stepped, dim=1), model(tokens))


assert decodes_as_it_runs(hybrid)

# %% [markdown]
# Jamba also makes every other MLP a mixture of experts: 16 SwiGLU experts of which a router sends each
# token to two {cite:p}`shazeer2017moe,fedus2022switch,jiang2024mixtral`, so the model holds about three
# times the parameters a token uses. Experts change what a layer computes per token, not the sequence
# mixing, so a mixture of experts sits beside any mixer (`moe_experts`, `moe_top_k`, `moe_every`) and
# decodes through the same states; `preset(size, "jamba")` builds Jamba's layout at the presets whose
# depth is a multiple of eight, matched to attention on the parameters a token uses.

# %%
import dataclasses

from lmscale.presets import param_counts, preset

jamba_cfg = preset("34M", "jamba")
active, total = param_counts(jamba_cfg, active=True)[0], param_counts(jamba_cfg)[0]
# the same layout, narrow enough to decode here in float64
jamba = LanguageModel(dataclasses.replace(jamba_cfg, d_model=32, n_heads=4, vocab_size=97, max_seq_len=64)).double()
assert [type(b.mlp).__name__ for b in jamba.blocks] == ["SwiGLU", "MoE"] * 4
assert [jamba.cfg.mixer_for_layer(i) for i in range(8)] == ["mamba"] * 4 + ["attention"] + ["mamba"] * 3
assert decodes_as_it_runs(jamba)
print(f"Jamba at the 34M preset: {active / 1e6:.1f}M parameters per token of {total / 1e6:.1f}M in all")

# %% [markdown]
# ## What each mixer costs
#
# Every mixer states its costs analytically — the decoding state it carries (`state_bytes`), the
# FLOPs and bytes of one decoding step (`step_cost`) and of a forward pass (`cost`). The table
# evaluates them for one layer at the width of a 125M-parameter model ($d = 768$, 12 heads, bfloat16
# weights and activations; recurrent states are accumulated and kept in float32, as the kernels keep
# them, and a KV cache in bfloat16), decoding after 2,048 tokens and training at $T = 2048$ (forward + backward ≈ 3× the forward
# matmul FLOPs {cite:p}`kaplan2020scaling`). Mixers whose layers differ (LEAP's windows, Based's mix of
# layer kinds) are averaged over a 12-layer stack. These are predictions; later chapters measure.

# %%
from lmscale.profile import mixer_table

WIDTH = {"d_model": 768, "n_heads": 12, "n_layers": 12, "dtype": torch.bfloat16}
costs = mixer_table(seq_len=2048, context_len=2048, **WIDTH)
shown = pd.DataFrame({
    "mixer": costs["name"],
    "family": costs["family"],
    "state (KiB)": costs["state_bytes"] / 1024,
    "state / token (B)": costs["state_bytes_per_token"],
    "decode MFLOP / token": costs["decode_flops_per_token"] / 1e6,
    "train MFLOP / token": costs["train_flops_per_token"] / 1e6,
    "params (M)": costs["params"] / 1e6,
})
plots.table(shown, "costs", formats={c: "{:,.1f}" for c in shown.columns[2:]})

# %% [markdown]
# Only softmax attention's state grows with the context. The figure shows the decoding memory of a
# whole 12-layer model at that width, for one sequence, from 256 tokens to a million.

# %%
contexts = [2**p for p in range(8, 21)]
memory = pd.concat(
    mixer_table(seq_len=2048, context_len=L, **WIDTH).assign(context=L)[["name", "context", "state_bytes"]]
    for L in contexts
)
memory["model state (MiB)"] = memory["state_bytes"] * WIDTH["n_layers"] / 2**20
display(alt.Chart(memory).mark_line(point=True).encode(
    x=alt.X("context:Q", scale=alt.Scale(type="log", base=2), title="context length (tokens)",
            axis=plots.tokens_axis([4**p for p in range(4, 11)])),
    y=alt.Y("model state (MiB):Q", scale=alt.Scale(type="log"), title="decoding state of one sequence (MiB)"),
    color=alt.Color("name:N", title="mixer"),
    tooltip=["name", "context", alt.Tooltip("model state (MiB):Q", format=".2f")],
).properties(title="Decode memory vs context, 12 layers at d = 768 (bfloat16)", width=520, height=320))
Markdown("*Computed from the mixers' cost models (`state_bytes`) at this build; nothing measured.*")

# %%
attention_at = memory[memory["name"] == "attention"].set_index("context")["model state (MiB)"]
recurrent = memory[~memory["name"].isin(["attention"])]
fixed = recurrent.groupby("name")["model state (MiB)"].agg(["min", "max"])
constant = fixed[fixed["min"] == fixed["max"]].index.tolist()
assert attention_at[2**20] == 1024 * attention_at[2**10]  # the KV cache is linear in the context
Markdown(
    f"At a million tokens attention's cache is **{attention_at[2**20] / 1024:,.0f} GiB** per sequence; "
    f"the state of {', '.join(constant)} does not depend on the context at all. "
    f"LEAP's windowed layers hold their windows' terms, so its state grows from "
    f"{fixed.loc['leap', 'min']:.1f} to {fixed.loc['leap', 'max']:.1f} MiB until the widest window is full."
)

# %% [markdown]
# ## What the papers report (literature)
#
# The table below is **literature, not measured here**: quality at about 1.3B parameters as three papers
# report it, from Table 2 of the GLA paper {cite:p}`yang2024gla`, Table 3 of the Mamba paper
# {cite:p}`gu2023mamba` and Table 3 of the Gated DeltaNet paper {cite:p}`yang2024gateddeltanet`. Each
# number was checked against the paper's table before it was written into
# `data/literature/published_results.csv` (which also holds LAMBADA perplexity), and is shown as printed. Numbers compare only within one
# paper: data, tokenizer, training length and the tasks averaged differ between them (6 tasks in the
# first two, 8 in the third). The report's own ladder asks the same question at smaller scale, on one
# corpus.

# %%
from lmscale.paths import data_dir

published = pd.read_csv(data_dir() / "literature" / "published_results.csv", dtype=str)
papers = {"yang2024gla": "GLA paper", "gu2023mamba": "Mamba paper", "yang2024gateddeltanet": "Gated DeltaNet paper"}
shown = pd.DataFrame({
    "model": published["model"],
    "size, tokens (data)": published["params"] + ", " + published["tokens"] + " (" + published["training_data"] + ")",
    "perplexity": published["perplexity"] + " (" + published["perplexity_on"] + ")",
    "LAMBADA acc (%)": published["lambada_acc"],
    "average acc (%)": published["average_acc"] + " (" + published["average_tasks"] + " tasks)",
    "source": [f"{papers[s]}, {t}" for s, t in zip(published["source"], published["table"], strict=True)],
})
display(plots.table(shown, "literature-published"))


def transformer_lead(source: str) -> str:
    """Within one paper: the Transformer's perplexity against the recurrent models'."""
    rows = published[published["source"] == source].assign(ppl=lambda f: f["perplexity"].astype(float))
    is_transformer = rows["model"].str.contains("Transformer")
    base = rows[is_transformer].iloc[0]
    better = rows[~is_transformer & (rows["ppl"] < base["ppl"])]
    if better.empty:
        return (f"in the {papers[source]} the Transformer keeps the lowest perplexity ({base['perplexity']}, "
                f"the others {rows[~is_transformer]['ppl'].min():.2f}–{rows[~is_transformer]['ppl'].max():.2f})")
    return (f"in the {papers[source]} {', '.join(better['model'])} "
            f"({', '.join(better['perplexity'])}) beat the Transformer's {base['perplexity']}")


Markdown("*Literature: numbers as printed in the cited papers' tables (`data/literature/published_results.csv`); "
         "none was measured by this report.* On perplexity, " + "; ".join(map(transformer_lead, papers)) + ".")
