"""MQAR and the recall experiment: the task is solvable, depends on its keys, keeps test apart from
train, refuses impossible difficulties; a run records accuracy and state size; JRT-Prompt and the
prefix encoder change what the model reads, and the loss is masked inside a non-causal prefix."""

import pytest
import torch

from lmscale.config import IGNORE_INDEX, ConfigError, ModelConfig
from lmscale.model import LanguageModel
from lmscale.recall import RecallConfig, recall_and_record, shown, state_bytes
from lmscale.results import read_records
from lmscale.sweep import expand, parse_spec
from lmscale.tasks.mqar import MQAR, accuracy, generate, lookup, train_test

TASK = MQAR(vocab_size=64, seq_len=48, num_pairs=6)


def test_a_perfect_memory_solves_every_example():
    x, y = generate(TASK, 200, seed=torch.seed() % 2**31)
    assert (lookup(x, TASK) == y).all()
    asked = y != IGNORE_INDEX
    assert (asked.sum(1) == TASK.num_pairs).all()  # every pair is asked about once
    keys, values = x[:, 0:12:2], x[:, 1:12:2]
    assert ((keys >= 1) & (keys < 32)).all() and ((values >= 32) & (values < 64)).all()
    assert all(len(set(row.tolist())) == 6 for row in keys) and all(len(set(row.tolist())) == 6 for row in values)
    logits = torch.nn.functional.one_hot(torch.where(asked, y, 0), 64).float()
    assert accuracy(logits, y) == (int(asked.sum()), int(asked.sum()))


def test_the_answers_depend_on_the_keys():
    x, y = generate(TASK, 50, seed=3)
    shuffled = x.clone()
    perm = torch.randperm(TASK.num_pairs)
    while (perm == torch.arange(TASK.num_pairs)).all():
        perm = torch.randperm(TASK.num_pairs)
    shuffled[:, 1:12:2] = x[:, 1:12:2][:, perm]  # the same values, given to other keys
    assert not (lookup(shuffled, TASK) == y).all()


def test_generation_is_seeded_and_test_is_disjoint_from_train():
    assert all((a == b).all() for a, b in zip(generate(TASK, 20, 7), generate(TASK, 20, 7), strict=True))
    tiny = MQAR(vocab_size=8, seq_len=8, num_pairs=2)  # few distinct examples: collisions are certain
    (x_train, _), (x_test, _) = train_test(tiny, 400, 400, seed=0)
    seen = {tuple(row) for row in x_train.tolist()}
    assert len(x_test) < 400 and not any(tuple(row) in seen for row in x_test.tolist())


@pytest.mark.parametrize("fields, message", [
    ({"seq_len": 30, "num_pairs": 8}, "at most seq_len / 4 = 7 pairs fit in seq_len=30"),
    ({"vocab_size": 16, "num_pairs": 8}, "gives 7 distinct keys .* raise vocab_size to at least 18"),
    ({"power_a": 0.0}, "must lie in"),
])
def test_impossible_difficulties_say_what_fits(fields, message):
    with pytest.raises(ConfigError, match=message):
        MQAR(**{"vocab_size": 64, "seq_len": 48, "num_pairs": 4, **fields})


def test_jrt_prompt_reads_the_context_twice_and_moves_the_answers():
    cfg = RecallConfig(vocab_size=64, seq_len=48, num_pairs=6, prompt="jrt")
    x, y = generate(cfg.task, 5, seed=1)
    xs, ys = shown(x, y, cfg)
    assert xs.shape == (5, 60) and cfg.prompt_len == 60
    assert (xs[:, :12] == x[:, :12]).all() and (xs[:, 12:] == x).all()
    assert (ys[:, :12] == IGNORE_INDEX).all() and (ys[:, 12:] == y).all()
    with pytest.raises(ConfigError, match="'prefix'=True: needs mixer 'jrt'"):
        RecallConfig(mixer="gla", prefix=True)
    prefixed = RecallConfig(mixer="jrt", prefix=True, vocab_size=64, seq_len=48, num_pairs=6, prompt="jrt")
    assert prefixed.model_config.mixer_options == {"prefix_len": 24}


def test_the_loss_inside_a_noncausal_prefix_is_masked():
    """Outputs before M − 1 see their next token through the prefix encoder: those targets must not count."""
    cfg = ModelConfig(mixer="jrt", vocab_size=32, d_model=16, n_layers=1, n_heads=1, max_seq_len=16,
                      mixer_options={"prefix_len": 6})
    model = LanguageModel(cfg)
    x = torch.randint(0, 32, (2, 12))
    y = torch.randint(0, 32, (2, 12))
    masked = y.clone()
    masked[:, :5] = IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(model(x).reshape(-1, 32), masked.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(model(x, targets=y), expected)
    assert model.unscored_prefix == 5 and LanguageModel(ModelConfig(mixer="jrt", vocab_size=32, d_model=16,
                                                                    n_layers=1, n_heads=1)).unscored_prefix == 0


def test_state_bytes_are_the_mixers_own_counts():
    attention = ModelConfig(mixer="attention", vocab_size=64, d_model=32, n_layers=2, n_heads=1, max_seq_len=64)
    assert state_bytes(attention, 64) == 2 * 2 * 64 * 32 * 2  # layers × (K, V) × tokens × width × bf16
    gla = ModelConfig(mixer="gla", vocab_size=64, d_model=32, n_layers=2, n_heads=1, max_seq_len=64)
    assert state_bytes(gla, 64) == state_bytes(gla, 32)  # a recurrence's state does not grow


def test_a_run_learns_and_records_accuracy_and_state(tmp_path):
    cfg = RecallConfig(mixer="attention", d_model=32, vocab_size=32, seq_len=16, num_pairs=2, steps=150,
                       warmup_steps=10, batch_size=32, n_train=2000, n_test=100, lr=1e-2)
    path, metrics = recall_and_record(cfg, experiment="recall-check", run_id="attention-check", results_root=tmp_path)
    record = read_records(path)[0]
    assert record["kind"] == "recall" and record["config"]["train"]["num_pairs"] == 2
    assert metrics["asked"] == 2 * metrics["test_examples"] and metrics["state_bytes"] == 2 * 2 * 16 * 32 * 2
    assert metrics["accuracy"] > 0.3  # guessing among the 16 values gives 1/16: it answers from the context


def test_a_recall_sweep_is_checked_before_it_runs():
    spec = parse_spec({"experiment": "e", "runner": "recall", "fixed": {"vocab_size": 64, "steps": 10, "warmup_steps": 1},
                       "grid": {"mixer": ["attention", "based"], "lr": [1.0e-3, 1.0e-2]},
                       "cases": [{"seq_len": 48, "num_pairs": 6}, {"seq_len": 64, "num_pairs": 16}]})
    runs = expand(spec)
    assert len(runs) == 8 and len({r.run_id for r in runs}) == 8
    with pytest.raises(ConfigError, match="at most seq_len / 4"):
        expand(parse_spec({"experiment": "e", "runner": "recall", "grid": {"num_pairs": [65]}}))
    with pytest.raises(ConfigError, match="unknown mixer"):
        expand(parse_spec({"experiment": "e", "runner": "recall", "grid": {"mixer": ["glaa"]}}))


def test_tables_keep_the_best_learning_rate_and_the_pareto_front():
    import pandas as pd

    from lmscale.recall import best_per_point, pareto_front, variant

    assert variant({"mixer": "gla", "prompt": "jrt", "prefix": False}) == "gla + JRT-Prompt"
    assert variant({"mixer": "jrt", "prompt": "jrt", "prefix": True}) == "jrt + JRT-Prompt + prefix encoder"
    rows = [("attention", 64, 1e-3, 0.9, 1000), ("attention", 64, 1e-2, 1.0, 1000), ("gla", 64, 1e-3, 0.5, 100),
            ("gla", 128, 1e-3, 0.95, 400), ("based", 64, 1e-3, 0.4, 200)]
    table = pd.DataFrame([{"model": m, "d_model": d, "task": "T=256, 16 pairs", "lr": lr, "accuracy": a,
                           "state_bytes": s} for m, d, lr, a, s in rows])
    best = best_per_point(table)
    assert len(best) == 4 and best.set_index(["model", "d_model"]).loc[("attention", 64), "lr"] == 1e-2
    front = pareto_front(best)
    assert front["model"].tolist() == ["gla", "gla", "attention"]  # based: more state than gla-64, less accuracy
