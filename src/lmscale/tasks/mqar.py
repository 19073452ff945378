"""Multi-query associative recall (MQAR), the recall task of Zoology (Arora et al. 2023).

A sequence opens with P key–value pairs, ``k_1 v_1 k_2 v_2 … k_P v_P``, and later asks for every key
again: somewhere in the rest of the sequence each key reappears, and the model must emit its value
as the next token. Everything else is a filler token. Keys come from ``[1, V/2)``, values from
``[V/2, V)`` (token 0 is the filler), so that a model cannot tell a key from a value by accident; within
an example keys are distinct and so are values, so every question has one answer.

The queries' places follow Zoology's power law: a query's slot (a pair of positions after the
context) is drawn with probability ∝ (slot + 1)^(a − 1), a = ``power_a`` (0.01: most queries come
soon after the context, some far away). The loss is taken on the answers only: ``targets`` holds the
value at each query key's position and ``IGNORE_INDEX`` everywhere else.

A model with softmax attention can look the key up at any distance; a recurrent model must have kept
it in its fixed-size state, which is what the experiment measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lmscale.config import IGNORE_INDEX, ConfigError

if TYPE_CHECKING:
    import torch

FILLER = 0


@dataclass(frozen=True)
class MQAR:
    """One difficulty: vocabulary V, sequence length T, P key–value pairs, query placement ``power_a``."""

    vocab_size: int = 8192
    seq_len: int = 256
    num_pairs: int = 16
    power_a: float = 0.01

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "num_pairs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(name, value, "must be a positive integer")
        if 4 * self.num_pairs > self.seq_len:
            raise ConfigError("num_pairs", self.num_pairs,
                              f"needs 4 positions per pair (the pair, then its query and answer), so at most "
                              f"seq_len / 4 = {self.seq_len // 4} pairs fit in seq_len={self.seq_len}; "
                              f"or raise seq_len to at least {4 * self.num_pairs}")
        fit = self.vocab_size // 2 - 1
        if self.num_pairs > fit:
            raise ConfigError("vocab_size", self.vocab_size,
                              f"gives {fit} distinct keys ([1, V/2)) for {self.num_pairs} pairs; at most {fit} pairs "
                              f"fit, or raise vocab_size to at least {2 * (self.num_pairs + 1)}")
        if not 0 < self.power_a <= 1:
            raise ConfigError("power_a", self.power_a, "must lie in (0, 1] (Zoology uses 0.01)")

    @property
    def context_len(self) -> int:
        """The positions of the key–value pairs at the start of every example."""
        return 2 * self.num_pairs


def generate(task: MQAR, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of ``task`` from ``seed`` alone: inputs [n, T] and targets [n, T] (int64)."""
    import torch

    rng = np.random.default_rng(seed)
    half, p, t = task.vocab_size // 2, task.num_pairs, task.seq_len
    keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :p] + 1  # p distinct keys in [1, V/2)
    values = np.argsort(rng.random((n, task.vocab_size - half)), axis=1)[:, :p] + half  # distinct, in [V/2, V)
    inputs = np.full((n, t), FILLER, dtype=np.int64)
    targets = np.full((n, t), IGNORE_INDEX, dtype=np.int64)
    inputs[:, 0:2 * p:2], inputs[:, 1:2 * p:2] = keys, values
    slots = (t - 2 * p) // 2  # each query takes two positions: the key, then its value
    weights = np.arange(1, slots + 1, dtype=np.float64) ** (task.power_a - 1)
    weights /= weights.sum()
    rows = np.arange(n)[:, None]
    chosen = np.stack([rng.choice(slots, size=p, replace=False, p=weights) for _ in range(n)])
    order = np.argsort(rng.random((n, p)), axis=1)  # which pair each chosen slot asks about
    where = 2 * p + 2 * chosen
    inputs[rows, where] = keys[rows, order]
    inputs[rows, where + 1] = values[rows, order]
    targets[rows, where] = values[rows, order]  # at the query key, the next token is its value
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def train_test(task: MQAR, n_train: int, n_test: int, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                           tuple[torch.Tensor, torch.Tensor]]:
    """Train and test sets from two seed streams, with any test example that also occurs in training
    dropped, so the test measures recall of pairs never trained on as a whole."""
    import torch

    train = generate(task, n_train, seed * 2 + 0)
    x, y = generate(task, n_test, seed * 2 + 1)
    seen = {row.tobytes() for row in train[0].numpy()}
    keep = torch.tensor([row.tobytes() not in seen for row in x.numpy()], dtype=torch.bool)
    return train, (x[keep], y[keep])


def lookup(inputs: torch.Tensor, task: MQAR) -> torch.Tensor:
    """The answers a perfect memory gives: at each query key (a key after the context), its value
    from the context; ``IGNORE_INDEX`` elsewhere. It solves the task by construction."""
    import torch

    p = task.num_pairs
    answers = torch.full_like(inputs, IGNORE_INDEX)
    for i, row in enumerate(inputs.tolist()):
        table = dict(zip(row[0:2 * p:2], row[1:2 * p:2], strict=True))
        for pos in range(2 * p, len(row) - 1, 2):
            if row[pos] in table:
                answers[i, pos] = table[row[pos]]
    return answers


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(correct, asked): argmax predictions that equal the answer, over the answer positions."""
    asked = targets != IGNORE_INDEX
    return int((logits.argmax(-1)[asked] == targets[asked]).sum()), int(asked.sum())
