"""The head's loss without the [tokens, vocab] logits equals the plain loss, its gradients and the model's."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lmscale.config import ModelConfig
from lmscale.loss import IGNORE_INDEX, chunk_rows, linear_cross_entropy, resolve_impl
from lmscale.model import LanguageModel

CUDA = torch.cuda.is_available()


def _inputs(n=37, d=24, v=301, dtype=torch.float32, device="cpu", ignored=5, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    hidden = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:ignored]] = IGNORE_INDEX
    return hidden, weight, targets.to(device)


def _loss_and_grads(impl, hidden, weight, targets, **kwargs):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, impl=impl, **kwargs)
    (loss * 1.7).backward()  # a non-unit upstream gradient
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("logit_bytes", [4 * 301 * 1, 4 * 301 * 8, 4 * 301 * 1000])  # 1 row, 8 rows (ragged), all
def test_chunked_equals_plain_cross_entropy_outputs_and_gradients(reduction, logit_bytes):
    hidden, weight, targets = _inputs()
    ref = _loss_and_grads("full", hidden, weight, targets, reduction=reduction)
    out = _loss_and_grads("chunked", hidden, weight, targets, reduction=reduction, logit_bytes=logit_bytes)
    plain = F.cross_entropy(hidden @ weight.T, targets, reduction=reduction)  # what a reader would write
    torch.testing.assert_close(ref[0], plain.detach())
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ignored_targets_add_nothing_and_the_mean_counts_the_rest():
    hidden, weight, targets = _inputs(ignored=0)
    keep = torch.arange(len(targets)) % 3 != 0
    masked = torch.where(keep, targets, IGNORE_INDEX)
    loss, h_grad, _ = _loss_and_grads("chunked", hidden, weight, masked, logit_bytes=4 * 301 * 4)
    only_kept = linear_cross_entropy(hidden[keep], weight, targets[keep], impl="full")
    torch.testing.assert_close(loss, only_kept.detach())
    assert torch.all(h_grad[~keep] == 0)


def test_bf16_autocast_runs_the_matmuls_in_bf16_like_the_plain_head():
    hidden, weight, targets = _inputs(n=64, d=32, ignored=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads("full", hidden, weight, targets)
        out = _loss_and_grads("chunked", hidden, weight, targets, logit_bytes=4 * 301 * 16)
        plain = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32  # grads return to the inputs' dtype
    torch.testing.assert_close(ref[0], plain.detach(), rtol=1e-3, atol=1e-3)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_without_gradients_the_loss_is_the_same():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        out = linear_cross_entropy(hidden, weight, targets, impl="chunked", logit_bytes=4 * 301 * 4)
    torch.testing.assert_close(out, linear_cross_entropy(hidden, weight, targets, impl="full").detach())


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_the_full_logits_are_never_materialised_in_forward_or_backward():
    hidden, weight, targets = _inputs(n=256, d=16, v=1000)
    rows = chunk_rows(1000, 256, logit_bytes=4 * 1000 * 32)
    assert rows == 32
    with _LargestTensor() as watch:
        linear_cross_entropy(hidden, weight, targets, impl="chunked", logit_bytes=4 * 1000 * 32).backward()
    assert watch.largest <= rows * 1000 < 256 * 1000
    with _LargestTensor() as watch:
        linear_cross_entropy(hidden, weight, targets, impl="full").backward()
    assert watch.largest >= 256 * 1000  # the watch sees the plain loss's logits


def test_model_loss_equals_cross_entropy_of_its_logits_with_the_same_gradients():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    torch.manual_seed(0)
    model = LanguageModel(cfg)
    idx, targets = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    plain = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    plain.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = model(idx, targets=targets)
    fused.backward()
    torch.testing.assert_close(fused, plain)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_per_target_losses_match_cross_entropy_in_chunks():
    """reduction="none" (the evaluation by position) is the plain per-token loss, shaped like the targets."""
    hidden, weight = torch.randn(3, 7, 16), torch.randn(301, 16)
    targets = torch.randint(0, 301, (3, 7))
    targets[1, 2] = IGNORE_INDEX
    losses = linear_cross_entropy(hidden, weight, targets, reduction="none", logit_bytes=4 * 301 * 5)  # 5-row chunks
    expected = F.cross_entropy((hidden @ weight.T).reshape(-1, 301), targets.reshape(-1), reduction="none",
                               ignore_index=IGNORE_INDEX).reshape(3, 7)
    assert losses.shape == (3, 7) and losses[1, 2] == 0
    torch.testing.assert_close(losses, expected)


def test_bad_requests_name_the_problem():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="'fused' is unknown; choose one of auto, chunked, liger, full"):
        linear_cross_entropy(hidden, weight, targets, impl="fused")
    with pytest.raises(ValueError, match="'liger' runs on CUDA only, not on cpu; use 'chunked'"):
        linear_cross_entropy(hidden, weight, targets, impl="liger")
    with pytest.raises(ValueError, match="must agree in all but the last dimension"):
        linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="reduction 'batchmean' is not supported; use 'mean', 'sum' or 'none'"):
        linear_cross_entropy(hidden, weight, targets, reduction="batchmean")
    assert resolve_impl("auto", torch.device("cpu"), needs_grad=True) == "chunked"


@pytest.mark.skipif(not CUDA, reason="bf16 on the GPU: the fused kernels run on CUDA only")
@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_gpu_bf16_loss_and_gradients_match_the_plain_loss(impl):
    if impl == "liger":
        pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    hidden, weight, targets = _inputs(n=4099, d=256, v=50257, dtype=torch.bfloat16, device="cuda", ignored=17)
    ref = _loss_and_grads("full", hidden.float(), weight.float(), targets)  # float32 reference of bf16 inputs
    out = _loss_and_grads(impl, hidden, weight, targets, logit_bytes=4 * 50257 * 1000)
    torch.testing.assert_close(out[0], ref[0], rtol=2e-3, atol=2e-3)
    for a, b, name in zip(out[1:], ref[1:], ("hidden", "weight"), strict=True):
        error = (a.float() - b).norm() / b.norm()
        assert error < 1e-2, f"{impl}: gradient of {name} off by {error:.2e} relative"
