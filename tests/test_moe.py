"""Mixture of experts (lmscale.mlp.MoE) against references written from the definition, and the
model, presets and trainer around it."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from lmscale.config import ConfigError, ModelConfig
from lmscale.mlp import MoE
from lmscale.model import LanguageModel
from lmscale.presets import param_counts, preset, preset_table

D, H = 16, 24


def make_moe(experts: int, top_k: int, capacity_factor=None, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(D, H, experts, top_k, capacity_factor).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def expert_out(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    expert = moe.experts[e]
    return F.linear(F.silu(F.linear(x, expert.gate_proj.weight)) * F.linear(x, expert.up_proj.weight),
                    expert.down_proj.weight)


def reference(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token by token: softmax over all experts, top-k renormalised; with a capacity, an expert serves
    assignments first choices first, then in token order, and drops the rest. Returns (output, dropped)."""
    x = x.reshape(-1, D)
    probs = torch.softmax(x @ moe.router.weight.t(), dim=-1)
    top = probs.topk(moe.top_k, dim=-1)
    capacity = moe.capacity(x.shape[0])
    served = [0] * len(moe.experts)
    keep = torch.zeros(x.shape[0], moe.top_k, dtype=torch.bool)
    for rank in range(moe.top_k):
        for t in range(x.shape[0]):
            e = int(top.indices[t, rank])
            if capacity is None or served[e] < capacity:
                served[e] += 1
                keep[t, rank] = True
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        weights = top.values[t] / top.values[t].sum()
        for rank in range(moe.top_k):
            if keep[t, rank]:
                out[t] += weights[rank] * expert_out(moe, int(top.indices[t, rank]), x[t])
    return out, int((~keep).sum())


def test_all_experts_chosen_is_the_dense_mixture():
    moe = make_moe(experts=4, top_k=4)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    probs = torch.softmax(x @ moe.router.weight.t(), dim=-1)
    dense = sum(probs[..., e : e + 1] * expert_out(moe, e, x) for e in range(4))
    torch.testing.assert_close(moe(x), dense)
    assert moe.dropped == 0


@pytest.mark.parametrize("experts,top_k", [(4, 1), (8, 2), (5, 3)])
def test_top_k_routing_matches_the_token_by_token_reference(experts, top_k):
    moe = make_moe(experts, top_k, seed=experts)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    out, dropped = reference(moe, x)
    torch.testing.assert_close(moe(x).reshape(-1, D), out)
    assert moe.dropped == dropped == 0


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_drops_exactly_the_assignments_past_it(capacity_factor):
    moe = make_moe(experts=4, top_k=2, capacity_factor=capacity_factor, seed=1)
    # a router leaning on expert 0, so that capacity binds
    with torch.no_grad():
        moe.router.weight[0] += 0.5
    x = torch.randn(40, D, dtype=torch.float64)
    out, dropped = reference(moe, x)
    torch.testing.assert_close(moe(x), out)
    assert moe.dropped == dropped
    if capacity_factor < 1:
        assert dropped > 0


def test_no_assignment_is_dropped_below_capacity():
    moe = make_moe(experts=4, top_k=2, capacity_factor=100.0, seed=2)
    dropless = make_moe(experts=4, top_k=2, capacity_factor=None, seed=2)
    x = torch.randn(64, D, dtype=torch.float64)
    torch.testing.assert_close(moe(x), dropless(x))
    assert moe.dropped == 0
    assert int((moe.load * 128).round().max()) <= moe.capacity(64)


def test_gradient_reaches_every_expert_used_and_only_those():
    moe = make_moe(experts=6, top_k=2, seed=3)
    with torch.no_grad():  # positive inputs: expert 5 is never among any token's top 2
        moe.router.weight[5] = -10.0
    x = torch.randn(30, D, dtype=torch.float64).abs()
    (moe(x).square().sum() + moe.aux_loss).backward()
    used = {e for e in range(6) if moe.load[e] > 0}
    assert 5 not in used and len(used) >= 2
    for e, expert in enumerate(moe.experts):
        for p in expert.parameters():
            assert p.grad is not None  # every expert is in the graph: DDP needs no find_unused_parameters
            assert (p.grad.abs().sum() > 0) == (e in used), (e, used)
    assert moe.router.weight.grad.abs().sum() > 0


def test_load_balancing_loss_is_one_when_uniform_and_grows_with_collapse():
    moe = make_moe(experts=4, top_k=1)
    x = torch.randn(50, D, dtype=torch.float64)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities: E · Σ f_e / E = 1 whatever the choices
    moe(x)
    assert float(moe.aux_loss.detach()) == pytest.approx(1.0)
    with torch.no_grad():
        moe.router.weight[0] = 10.0  # positive inputs: every token to expert 0, with probability ≈ 1
    moe(x.abs())
    assert float(moe.aux_loss.detach()) == pytest.approx(4.0, rel=1e-3)  # E = 4: total collapse gives E


def moe_config(**fields) -> ModelConfig:
    base = {"mixer": "gla", "vocab_size": 97, "d_model": 32, "n_layers": 4, "n_heads": 2, "max_seq_len": 64,
            "moe_experts": 4, "moe_top_k": 2, "moe_every": 2}
    return ModelConfig(**{**base, **fields})


def test_model_places_experts_every_nth_layer_and_counts_active_parameters():
    torch.manual_seed(0)
    cfg = moe_config()
    model = LanguageModel(cfg)
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == [False, True, False, True]
    expert = 3 * cfg.d_model * cfg.d_hidden
    assert model.num_params() - model.num_params(active=True) == 2 * 2 * expert  # 2 layers × 2 idle experts
    dense = LanguageModel(dataclasses.replace(cfg, moe_experts=0))
    router = cfg.d_model * cfg.moe_experts
    assert model.num_params(active=True) == dense.num_params() + 2 * (expert + router)
    assert model.flops_per_token(16) == pytest.approx(dense.flops_per_token(16) + 2 * 2 * (expert + router))


def test_training_objective_adds_the_weighted_balance_loss_and_evaluation_does_not():
    torch.manual_seed(0)
    model = LanguageModel(moe_config(moe_aux_loss_coef=0.5))
    idx = torch.randint(0, 97, (2, 12))
    model.eval()
    lm = model(idx, targets=idx)
    model.train()
    objective = model(idx, targets=idx)
    torch.testing.assert_close(objective, lm + 0.5 * model.moe_aux_loss)
    objective.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_model_copies_after_a_training_forward_without_its_graph():
    import copy

    model = LanguageModel(moe_config())
    idx = torch.randint(0, 97, (2, 12))
    model(idx, targets=idx).backward()
    twin = copy.deepcopy(model)
    assert all(b.mlp.aux_loss is None for b in twin.blocks if isinstance(b.mlp, MoE))
    assert model.moe_aux_loss.grad_fn is None


def test_relu_gates_give_exact_zeros_and_an_unknown_activation_names_the_choices():
    from lmscale.config import MLP_ACTIVATIONS
    from lmscale.mlp import ACTIVATIONS

    assert set(ACTIVATIONS) == set(MLP_ACTIVATIONS)  # the config's names (no torch there) are the module's
    torch.manual_seed(0)
    model = LanguageModel(moe_config(mlp_activation="relu", moe_experts=0))
    hidden = []
    model.blocks[0].mlp.down_proj.register_forward_pre_hook(lambda _m, args: hidden.append(args[0]))
    model(torch.randint(0, 97, (2, 12)))
    assert 0.3 < float((hidden[0] == 0).float().mean()) < 0.7
    with pytest.raises(ConfigError, match="'mlp_activation'='gelu': must be one of 'silu', 'relu'"):
        moe_config(mlp_activation="gelu")


def test_decoding_token_by_token_equals_the_forward():
    torch.manual_seed(0)
    model = LanguageModel(moe_config(mixer="attention")).eval()
    idx = torch.randint(0, 97, (2, 9))
    logits = model(idx)
    state = model.init_state(2, "cpu", torch.float32)
    for t in range(9):
        step, state = model.step(idx[:, t], state)
        torch.testing.assert_close(step, logits[:, t], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("field,value", [("moe_experts", -1), ("moe_top_k", 5), ("moe_top_k", 0),
                                         ("moe_every", 9), ("moe_capacity_factor", 0.0),
                                         ("moe_aux_loss_coef", math.nan)])
def test_impossible_moe_configs_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        moe_config(**{field: value})


def test_presets_match_mixtures_on_active_parameters():
    for size in ("34M", "350M"):
        reference = param_counts(preset(size, "attention"))[1]
        cfg = preset(size, "gla", moe_experts=8, moe_top_k=2)
        active, total = param_counts(cfg, active=True)[1], param_counts(cfg)[1]
        assert abs(active / reference - 1) <= 0.05
        assert total > 2.5 * active


def test_jamba_preset_is_the_papers_layout():
    cfg = preset("350M", "jamba")
    assert len(cfg.layers) == 24 and cfg.layers.count("attention") == 3
    assert [i for i, name in enumerate(cfg.layers) if name == "attention"] == [4, 12, 20]
    assert set(cfg.layers) == {"mamba", "attention"}
    assert (cfg.moe_experts, cfg.moe_top_k) == (16, 2)
    assert [i for i in range(24) if cfg.is_moe_layer(i)] == list(range(1, 24, 2))
    row = preset_table(["jamba"], ["350M"]).iloc[0]
    assert abs(row["ratio_to_attention"] - 1) <= 0.05 and row["total_params"] > 2.5 * row["params"]
    with pytest.raises(ConfigError, match="groups of 8"):
        preset("125M", "jamba")


def test_a_sweep_names_jamba_and_hands_its_runs_the_name():
    from lmscale.sweep import _DirectRunner, expand, parse_spec

    [run] = expand(parse_spec({"experiment": "e", "fixed": {"preset": "34M", "steps": 2, "warmup_steps": 1},
                               "grid": {"mixer": ["jamba"]}}))
    assert run.run_id.startswith("jamba-d384-l8") and run.params["moe_experts"] == 16
    command = _DirectRunner().command("e", run, None)[0]
    assert command[command.index("--mixer") + 1] == "jamba" and "--preset" in command
