"""``lmscale data|train|sweep|bench|mixers …``: a thin shell over the functions the notebooks call."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from lmscale.bench import KERNEL_OPS
from lmscale.config import ConfigError, ModelConfig, TrainConfig
from lmscale.results import code_commit, require_commit


def _name_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",")]


def _int_list(text: str) -> list[int]:
    try:
        return [int(value) for value in _name_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1024,4096") from None


def _switch(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no): ``bool("False")`` would be True."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


# parsers for fields whose default (None) does not tell their type; keyed by the annotation
_OPTIONAL_FIELD_TYPES = {"int | None": int, "float | None": float, "list[str] | None": _name_list,
                         "list[int] | None": _int_list}


def _add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: set[str]) -> None:
    """One ``--field`` flag per dataclass field, so the CLI never drifts from the configs."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default
        if isinstance(default, bool):  # --compile alone means --compile true
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_switch, nargs="?", const=True,
                                default=None, metavar="true|false", help=f"default {default!r}")
            continue
        if default is None:
            kind = _OPTIONAL_FIELD_TYPES.get(str(f.type), str)
        else:
            kind = type(default) if default is not dataclasses.MISSING else str
        note = ", comma-separated" if kind in (_name_list, _int_list) else ""
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                            help=f"default {default!r}{note}")


def _picked(args: argparse.Namespace, cls, skip: set[str]) -> dict[str, Any]:
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.name not in skip and getattr(args, f.name, None) is not None
    }


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError("mixer_options", pair, "write each mixer option as KEY=VALUE (VALUE in JSON, e.g. form=\"chunk\")")
        key, raw = pair.split("=", 1)
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from lmscale.data import prepare_corpus

    manifest = prepare_corpus(out_dir=args.out, cache_dir=args.cache, force=args.force, sources=args.source)
    _print_manifest(manifest)
    return 0


def _cmd_data_show(args: argparse.Namespace) -> int:
    from lmscale.data import load_manifest

    _print_manifest(load_manifest(args.out))
    return 0


def _print_manifest(manifest: dict[str, Any]) -> None:
    import pandas as pd

    from lmscale.data import manifest_table

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(manifest_table(manifest).to_string(index=False))


def _cmd_train(args: argparse.Namespace) -> int:
    from lmscale.train import TokenData, check_device, train_and_record

    model_fields = _picked(args, ModelConfig, {"mixer_options"})
    options = _parse_options(args.mixer_option)
    if args.preset:  # the preset's shape, parameter-matched for this mixer; explicit flags override
        from lmscale.presets import preset

        model_cfg = preset(args.preset, model_fields.pop("mixer", "attention"), **model_fields,
                           **({"mixer_options": options} if options else {}))
    else:
        model_cfg = ModelConfig(**model_fields, mixer_options=options)
    train_cfg = TrainConfig(**_picked(args, TrainConfig, set()))
    check_device(train_cfg.device)  # before the corpus is read: a missing GPU is the first thing to say
    data = TokenData.from_corpus(args.corpus)
    path, result = train_and_record(
        args.experiment, model_cfg, train_cfg, data, data_name="corpus",
        out_dir=args.out_dir, resume=args.resume, progress=sys.stderr.isatty(), run_id=args.run_id,
    )
    if path is None:  # a torchrun process other than rank 0, which reports for all
        return 0
    print(json.dumps(result.metrics, indent=2))
    print(f"record: {path}")
    return 0


def _cmd_mixers(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from lmscale.profile import format_mixer_table, mixer_table

    table = mixer_table(d_model=args.d_model, n_heads=args.n_heads, seq_len=args.seq_len,
                        context_len=args.context_len, dtype=getattr(torch, args.dtype), n_layers=args.n_layers)
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 120):
        print(format_mixer_table(table))
    return 0


def _cmd_recall(args: argparse.Namespace) -> int:
    from lmscale.recall import RecallConfig, recall_and_record

    fields = _picked(args, RecallConfig, {"mixer_options"})
    cfg = RecallConfig(**fields, mixer_options=_parse_options(args.mixer_option))
    path, metrics = recall_and_record(cfg, experiment=args.experiment, run_id=args.run_id)
    print(f"accuracy {metrics['accuracy']:.4f} ({metrics['correct']}/{metrics['asked']}), state "
          f"{metrics['state_bytes']:,} bytes; record: {path}")
    return 0


def _cmd_precision(args: argparse.Namespace) -> int:
    from lmscale.precision import precision_and_record

    path, metrics = precision_and_record(args.checkpoint, device=args.device, eval_batches=args.eval_batches,
                                         batch_size=args.batch_size, decode_windows=args.decode_windows,
                                         decode_len=args.decode_len, experiment=args.experiment, run_id=args.run_id)
    for name, result in metrics.items():
        if isinstance(result, dict):
            loss = result.get("loss")
            print(f"{name:>14}: " + (f"{loss:.4f}" if loss is not None else f"not supported ({result['not_supported']})"))
    print(f"record: {path}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Exit status 1 when any run failed, so scripts notice; its error record says why."""
    from lmscale.sweep import format_summary, load_spec, run_sweep

    outcomes = run_sweep(load_spec(args.spec), jobs=args.jobs, dry_run=args.dry_run, progress=True)
    print(format_summary(outcomes))
    return 1 if any(o.status == "error" for o in outcomes) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmscale", description=__doc__)
    parser.add_argument("--git-commit", default=None, metavar="SHA",
                        help="the commit this code is, for records made where the tree has no .git (the GPU "
                             "machine); sets LMSCALE_GIT_COMMIT for this process and its children")
    parser.add_argument("--debug", action="store_true",
                        help="let every error raise with its full traceback, user errors included")
    parser.add_argument("--git-dirty", type=_switch, default=False, metavar="true|false",
                        help="with --git-commit: whether the tree differs from that commit (default false)")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="the offline corpus").add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser("prepare", help="fetch the pinned sources, verify, split, tokenize, write memmaps")
    prepare.add_argument("--out", type=Path, default=None, help="corpus folder (default data/corpus)")
    prepare.add_argument("--cache", type=Path, default=None, help="download cache (default data/cache)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if the manifest is current")
    prepare.add_argument("--source", action="append", default=None, help="only these sources (repeatable)")
    prepare.set_defaults(func=_cmd_data_prepare)
    show = data.add_parser("show", help="print the manifest's table")
    show.add_argument("--out", type=Path, default=None)
    show.set_defaults(func=_cmd_data_show)

    train = sub.add_parser("train", help="train one model on the corpus and write a result record")
    train.add_argument("--experiment", default="train", help="records go to data/results/<experiment>/")
    train.add_argument("--corpus", type=Path, default=None, help="corpus folder (default data/corpus)")
    train.add_argument("--out-dir", type=Path, default=None, help="log.jsonl and checkpoint.pt go here")
    train.add_argument("--preset", default=None,
                       help="a size preset (see `lmscale presets`); other model flags override it")
    train.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    train.add_argument("--mixer-option", action="append", default=[], metavar="KEY=VALUE",
                       help="a mixer option, VALUE in JSON (repeatable); in a hybrid KEY is a mixer "
                            "name and VALUE its options, e.g. gla='{\"form\": \"chunk\"}'")
    _add_dataclass_args(train, ModelConfig, {"mixer_options"})
    _add_dataclass_args(train, TrainConfig, set())
    train.add_argument("--run-id", default=None,
                       help="the record's name (default: date and a random suffix); sweeps derive it from the parameters")
    train.set_defaults(func=_cmd_train)

    recall = sub.add_parser("recall", help="train a small model on multi-query associative recall (MQAR) and "
                                           "record its test accuracy and state size")
    recall.add_argument("--experiment", default="recall", help="records go to data/results/<experiment>/")
    recall.add_argument("--mixer-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a mixer option, VALUE in JSON (repeatable)")
    recall.add_argument("--run-id", default=None, help="the record's name (default: date and a random suffix)")
    from lmscale.recall import RecallConfig

    _add_dataclass_args(recall, RecallConfig, {"mixer_options"})
    recall.set_defaults(func=_cmd_recall)

    precision = sub.add_parser("precision", help="a trained checkpoint's validation loss under int8, int4 and "
                                                 "ternary weights and with its decode state in 8 and 4 bits, and the "
                                                 "sparsity of its activations and state updates (issue 17)")
    precision.add_argument("checkpoint", type=Path, help="a trainer checkpoint (out_dir/checkpoint.pt)")
    precision.add_argument("--device", default="cpu")
    precision.add_argument("--eval-batches", type=int, default=16)
    precision.add_argument("--batch-size", type=int, default=16)
    precision.add_argument("--decode-windows", type=int, default=8, help="windows decoded token by token")
    precision.add_argument("--decode-len", type=int, default=256)
    precision.add_argument("--experiment", default="neuromorphic", help="records go to data/results/<experiment>/")
    precision.add_argument("--run-id", default=None)
    precision.set_defaults(func=_cmd_precision)

    sweep = sub.add_parser("sweep", help="train every point of a YAML spec's grid, each in its own process; "
                                         "runs with an ok record are skipped, failed ones retried")
    sweep.add_argument("spec", type=Path, help="YAML: experiment, runner (direct|papermill), fixed, grid")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at once (each child then gets one thread)")
    sweep.add_argument("--dry-run", action="store_true", help="check the spec and list the runs; run nothing")
    sweep.set_defaults(func=_cmd_sweep)

    mixers = sub.add_parser("mixers", help="every registered mixer's decode state, decode and training "
                                           "FLOPs and parameters at one width (analytic)")
    mixers.add_argument("--d-model", type=int, default=768)
    mixers.add_argument("--n-heads", type=int, default=12)
    mixers.add_argument("--seq-len", type=int, default=2048, help="training sequence length T")
    mixers.add_argument("--context-len", type=int, default=2048, help="tokens of context before decoding")
    mixers.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="dtype of the state and weights")
    mixers.add_argument("--n-layers", type=int, default=12,
                        help="stack over which layer-dependent mixers are averaged")
    mixers.set_defaults(func=_cmd_mixers)

    presets = sub.add_parser("presets", help="the named sizes (tiny … 1.3B) for every mixer, MLP width "
                                             "solved so parameters match attention's within ±5%%")
    presets.add_argument("--mixer", action="extend", nargs="+", default=None, help="only these mixers")
    presets.set_defaults(func=_cmd_presets)

    bench = sub.add_parser("bench", help="benchmarks, checked against references before they are timed; "
                                         "they write result records").add_subparsers(dest="bench_command",
                                                                                      required=True)
    kernels = bench.add_parser("kernels", help="the GPU kernels against the PyTorch forms, "
                                               "flash-linear-attention and SDPA (see lmscale.bench.kernels)")
    kernels.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    kernels.add_argument("--quick", action="store_true",
                         help="tiny sizes (the CPU runs the kernels through Triton's interpreter)")
    kernels.add_argument("--ops", type=_name_list, default=None,
                         help=f"comma-separated subset of {','.join(KERNEL_OPS)} (default: all)")
    kernels.add_argument("--out", type=Path, default=None,
                         help="folder for the one .jsonl of records (default data/results/kernels)")
    kernels.add_argument("--check-only", action="store_true",
                         help="run the correctness gates and print them; time nothing")
    kernels.add_argument("--seed", type=int, default=0)
    kernels.add_argument("--model-preset", default=None,
                         help="size of the GLA model of op model_step (default 1.3B; tiny with --quick)")
    kernels.add_argument("--mixers", type=_name_list, default=None,
                         help="op mixer_layer: only these comma-separated mixers (default: every registered one)")
    kernels.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                         help="start no measurement after this long; the rest are recorded as skipped")
    kernels.add_argument("--impls", type=_name_list, default=None,
                         help="time only these implementations, e.g. ours,fla,sdpa (default: all, PyTorch forms "
                              "included); the correctness references run either way")
    kernels.set_defaults(func=_cmd_bench_kernels)

    bench_train = bench.add_parser("train", help="tokens/s, MFU, peak memory and top kernels of the trainer's step "
                                                 "for every mixer at the 125M and 350M presets "
                                                 "(see lmscale.bench.training)")
    bench_train.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    bench_train.add_argument("--mixers", type=_name_list, default=None, help="default: every registered mixer")
    bench_train.add_argument("--presets", type=_name_list, default=None, help="default: 125M,350M (tiny with --quick)")
    bench_train.add_argument("--seq-len", type=int, default=None, help="default 2048 (64 with --quick)")
    bench_train.add_argument("--tokens-per-step", type=int, default=None,
                             help="tokens per optimiser step, whole sequences (default 32768; 256 with --quick)")
    bench_train.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default 5)")
    bench_train.add_argument("--timed-steps", type=int, default=None, help="steps timed (default 10)")
    bench_train.add_argument("--compile", type=_switch, default=None, metavar="true|false",
                             help="compile the blocks (default: true on CUDA, false on the CPU)")
    bench_train.add_argument("--loss-impl", default="auto", help="auto|chunked|liger|full (lmscale.loss)")
    bench_train.add_argument("--activation-checkpointing", type=_switch, default=False, metavar="true|false",
                             help="recompute each block in the backward (default false)")
    bench_train.add_argument("--micro-batches", type=int, default=1, metavar="N",
                             help="run the step's sequences in N forward/backward passes, gradients accumulated "
                                  "(default 1): the other way to fit a step in less memory")
    bench_train.add_argument("--profile", type=_switch, default=True, metavar="true|false",
                             help="profile one step for the top kernels (default true)")
    bench_train.add_argument("--count-flops", type=_switch, default=True, metavar="true|false",
                             help="count one eager step with torch.utils.flop_counter (default true)")
    bench_train.add_argument("--quick", action="store_true", help="tiny preset, short sequences: the CPU test size")
    bench_train.add_argument("--out", type=Path, default=None, help="record folder (default data/results/throughput)")
    bench_train.add_argument("--force", action="store_true", help="measure points that have an ok record already")
    bench_train.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                             help="start no point after this long; the rest are left for the next run")
    bench_train.add_argument("--in-process", action="store_true",
                             help="measure in this process instead of one process per point")
    bench_train.set_defaults(func=_cmd_bench_train)

    bench_loss = bench.add_parser("loss", help="the head's loss without logits: each implementation's time, "
                                               "memory and error at the presets' widths")
    bench_loss.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    bench_loss.add_argument("--presets", type=_name_list, default=["125M", "350M"])
    bench_loss.add_argument("--tokens", type=int, default=32768)
    bench_loss.add_argument("--out", type=Path, default=None, help="record folder (default data/results/throughput)")
    bench_loss.set_defaults(func=_cmd_bench_loss)

    bench_inf = bench.add_parser("inference", help="prefill tokens/s and decode ms per step of whole models, beside "
                                                   "their roofline prediction, with memory and energy "
                                                   "(see lmscale.bench.inference)")
    bench_inf.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    bench_inf.add_argument("--mixers", type=_name_list, default=None, help="default: every registered mixer")
    bench_inf.add_argument("--presets", type=_name_list, default=None,
                           help="default: 50M,125M,350M,760M,1.3B on a GPU, 50M,125M on the CPU")
    bench_inf.add_argument("--dtypes", type=_name_list, default=None,
                           help="bfloat16 and/or float32 (default: bfloat16 on a GPU, both on the CPU)")
    bench_inf.add_argument("--prefill-lengths", type=_int_list, default=None, help="T of the prefills "
                           "(default 512,2048,8192,32768; 0 for none)")
    bench_inf.add_argument("--contexts", type=_int_list, default=None, help="contexts before the timed decode "
                           "steps (default 1024,8192,32768,131072; 0 for none)")
    bench_inf.add_argument("--batches", type=_int_list, default=None, help="decode batch sizes (default 1,16)")
    bench_inf.add_argument("--decode-tokens", type=int, default=32, help="steps per timed repeat (default 32)")
    bench_inf.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default 5)")
    bench_inf.add_argument("--energy", type=_switch, default=True, metavar="true|false",
                           help="measure energy with NVML where there is one (default true)")
    bench_inf.add_argument("--out", type=Path, default=None, help="record folder (default data/results/inference)")
    bench_inf.add_argument("--force", action="store_true", help="measure points that have a record already")
    bench_inf.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                           help="start no point after this long; the rest are left for the next run")
    bench_inf.set_defaults(func=_cmd_bench_inference)

    bench_flops = bench.add_parser("flops", help="each mixer's analytic prefill FLOPs against those counted by "
                                                 "torch.utils.flop_counter on the meta device (no timing)")
    bench_flops.add_argument("--mixers", type=_name_list, default=None, help="default: every registered mixer")
    bench_flops.add_argument("--presets", type=_name_list, default=None, help="default: 50M,125M,350M,760M,1.3B")
    bench_flops.add_argument("--lengths", type=_int_list, default=None, help="T (default 512,2048,8192,32768)")
    bench_flops.add_argument("--out", type=Path, default=None, help="record folder (default data/results/inference)")
    bench_flops.set_defaults(func=_cmd_bench_flops)

    budget = sub.add_parser("budget", help="training tokens for a model size by each published rule "
                                           "(Chinchilla 20×, its fit, Epoch's refit, data-constrained)")
    budget.add_argument("--params", required=True, help="parameters N, e.g. 125M, 1.3B or 6.5e6")
    budget.add_argument("--unique-tokens", default=None, help="unique tokens in the corpus, e.g. 6.5M")
    budget.set_defaults(func=_cmd_budget)
    return parser


def _cmd_bench_kernels(args: argparse.Namespace) -> int:
    """Exit status 1 when an implementation failed its correctness gate, so scripts notice."""
    import torch

    if args.device == "cpu" or not torch.cuda.is_available():  # Triton runs kernels on CPU tensors only in
        os.environ.setdefault("TRITON_INTERPRET", "1")  # its interpreter, chosen before a kernel is defined
    from lmscale.bench.kernels import format_table, run_suite

    records, path = run_suite(device=args.device, quick=args.quick, ops=args.ops, out=args.out,
                              check_only=args.check_only, seed=args.seed, model_preset=args.model_preset,
                              mixers=args.mixers, time_limit_s=None if args.time_limit is None else 60 * args.time_limit,
                              impl_names=args.impls)
    print(format_table(records))
    print(f"written: {path}")
    return 1 if any(r["status"] == "wrong" for r in records) else 0


def _cmd_bench_train(args: argparse.Namespace) -> int:
    """Exit status 1 when a point failed (its record says why), so scripts notice."""
    from lmscale.bench.training import EXPERIMENT, SIZES, Point, format_table, run_points
    from lmscale.mixers import available
    from lmscale.paths import results_dir

    device = args.device  # main() resolved the default
    quick = {"presets": ["tiny"], "seq_len": 64, "tokens_per_step": 256, "warmup_steps": 1, "timed_steps": 2}

    def pick(name: str, default: Any) -> Any:
        """The flag if given, else the quick size under --quick, else the full size."""
        value = getattr(args, name)
        return value if value is not None else quick[name] if args.quick else default

    points = [Point(mixer=m, preset=p, seq_len=pick("seq_len", 2048), tokens_per_step=pick("tokens_per_step", 32768),
                    compile=args.compile if args.compile is not None else device.startswith("cuda"),
                    loss_impl=args.loss_impl, activation_checkpointing=args.activation_checkpointing,
                    micro_batches=args.micro_batches,
                    warmup_steps=pick("warmup_steps", 5), timed_steps=pick("timed_steps", 10),
                    profile=args.profile, count_flops=args.count_flops)
              for p in pick("presets", list(SIZES)) for m in (args.mixers or available())]
    records, path = run_points(points, device, args.out or results_dir() / EXPERIMENT, force=args.force,
                               time_limit_s=None if args.time_limit is None else 60 * args.time_limit,
                               in_process=args.in_process)
    print(format_table(records))
    print(f"written: {path}" if records else "no record written")
    return 1 if any(r["status"] != "ok" for r in records) else 0


def _cmd_bench_inference(args: argparse.Namespace) -> int:
    """Exit status 1 when a point failed (skipped points are not failures: their record says why)."""
    from lmscale.bench import inference
    from lmscale.mixers import available
    from lmscale.paths import results_dir

    gpu = args.device.startswith("cuda")  # main() resolved the default

    def lengths(given: list[int] | None, default: tuple[int, ...]) -> list[int]:
        return list(default) if given is None else [n for n in given if n]

    grid = inference.points(
        args.mixers or available(),
        args.presets or (inference.GPU_PRESETS if gpu else inference.CPU_PRESETS),
        args.dtypes or (["bfloat16"] if gpu else list(inference.DTYPES)),
        lengths(args.prefill_lengths, inference.PREFILL_LENGTHS), lengths(args.contexts, inference.DECODE_CONTEXTS),
        args.batches or inference.DECODE_BATCHES, decode_tokens=args.decode_tokens, repeats=args.repeats,
        energy=args.energy)
    records, path = inference.run_points(grid, args.device, args.out or results_dir() / inference.EXPERIMENT,
                                         force=args.force,
                                         time_limit_s=None if args.time_limit is None else 60 * args.time_limit)
    print(inference.format_table(records))
    print(f"written: {path}" if records else "no record written")
    return 1 if any(r["status"] == "error" for r in records) else 0


def _cmd_bench_flops(args: argparse.Namespace) -> int:
    import time

    from lmscale.bench import inference
    from lmscale.mixers import available
    from lmscale.paths import results_dir
    from lmscale.results import write_records

    records = inference.flop_check_records(args.mixers or available(), args.presets or inference.GPU_PRESETS,
                                           args.lengths or inference.PREFILL_LENGTHS)
    for r in records:
        c, m = r["config"], r["metrics"]
        print(f"{c['mixer']:>16} {c['preset']:>5} T={c['length']:<6} analytic {m['flops']:.3e}  counted "
              f"{m['flops_counted']:.3e}  ratio {m['flops_analytic_over_counted']:.4f}")
    out = (args.out or results_dir() / inference.EXPERIMENT) / f"flops-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    print(f"written: {write_records(records, out)}")
    return 0


def _cmd_bench_loss(args: argparse.Namespace) -> int:
    import time

    from lmscale.bench.training import EXPERIMENT, loss_records
    from lmscale.paths import results_dir
    from lmscale.results import write_records

    records = loss_records(args.presets, args.device, args.tokens)  # main() resolved the default device
    path = write_records(records, (args.out or results_dir() / EXPERIMENT) / f"loss-bench-{time.strftime('%Y%m%dT%H%M%S')}.jsonl")
    for r in records:
        m = r["metrics"]
        timing = f"{m['ms_median']:8.2f} ms  +{m.get('extra_memory_bytes', 0) / 2**30:5.2f} GiB  " \
                 f"grad err {m['grad_hidden_rel_error']:.1e} / {m['grad_weight_rel_error']:.1e}" \
            if r["status"] == "ok" else r["error"]
        print(f"{r['config']['preset']:>6} {r['config']['impl']:>8}  {timing}")
    print(f"written: {path}")
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    from lmscale.scaling import format_budgets, parse_count

    unique = None if args.unique_tokens is None else parse_count(args.unique_tokens, "unique_tokens")
    print(format_budgets(parse_count(args.params, "params"), unique))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from lmscale.presets import format_preset_table, preset_table

    print(format_preset_table(preset_table(args.mixer)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.git_commit:
        os.environ["LMSCALE_GIT_COMMIT"] = args.git_commit
        os.environ["LMSCALE_GIT_DIRTY"] = str(args.git_dirty).lower()
    code_commit()  # read now: a long run's records name the commit it started at
    try:
        device = getattr(args, "device", None)
        if device is None and args.command == "bench":  # the benchmarks default to the GPU when there is one
            import torch

            device = args.device = "cuda" if torch.cuda.is_available() else "cpu"
        require_commit(device)  # before any GPU work: a GPU number that cannot name its code is not kept
        return args.func(args)
    except Exception as e:
        if args.debug:
            raise
        if is_user_error(e):
            print(f"lmscale: error: {e}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"lmscale: internal error ({type(e).__name__}), a bug rather than bad input: the traceback above "
              "says where; please report it with the command line", file=sys.stderr)
        return 1


# lmscale's own errors about what the user asked; looked up only in modules already imported, so the
# command line never imports torch to classify an error
_USER_ERRORS = {"lmscale.config": ("ConfigError",), "lmscale.results": ("RecordError",),
                "lmscale.data.sources": ("DataSourceError",),
                "lmscale.train": ("CheckpointError", "TrainingDivergedError", "TrainingInterrupted")}


def is_user_error(e: BaseException) -> bool:
    """Bad input, not a bug: one of lmscale's error types, a missing or unreadable file, or a ValueError,
    RuntimeError or OSError raised by lmscale's own code (its message was written for the user). The
    same types raised inside a library (torch, numpy) are bugs, and keep their traceback."""
    types = [FileNotFoundError, PermissionError, IsADirectoryError]
    for module, names in _USER_ERRORS.items():
        if module in sys.modules:
            types += [getattr(sys.modules[module], name) for name in names]
    if isinstance(e, tuple(types)):
        return True
    if not isinstance(e, (ValueError, RuntimeError, OSError)):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = Path(__file__).resolve().parent
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


if __name__ == "__main__":
    sys.exit(main())
