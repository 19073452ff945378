"""Sweeps: an experiment is a list of runs, and a sweep is the product of a spec's lists (Zoology style).

A YAML spec names the experiment, the runner, fixed parameters and a grid::

    experiment: tiny-sweep
    runner: direct          # or papermill (through notebooks/train.py)
    fixed: {d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32, max_seq_len: 32, steps: 20}
    grid: {mixer: [attention, gla], seed: [0, 1]}
    cases:                  # optional: settings that go together; every grid point runs each case
      - {seq_len: 256, batch_size: 128}
      - {seq_len: 4096, batch_size: 8}

``cases`` may also map names to such lists (``cases: {model: [...], context: [...]}``): every
combination of one case from each list is run, crossed with the grid.

Every run executes in its own process (``python -m lmscale train`` or papermill on the template), so
one run's crash, memory or thread settings cannot touch another, and writes
``<results>/<experiment>/<run_id>.jsonl``. The run id is a pure function of the parameters, so running
a spec again skips every run whose record has status "ok" and runs the others: an interrupted sweep
resumes. A run that fails leaves a record with status "error" (its parameters and the tail of its
stderr) and the sweep goes on; error records are not skipped, so the next run of the spec retries them.
A direct run trains with ``--out-dir <results>/<experiment>/.checkpoints/<run_id>``: stopped by SIGTERM
(or at a ``checkpoint_interval``) it leaves a checkpoint there, and the retry continues from it with
``--resume``, exactly as if it had not stopped; the folder is removed once the run's ok record exists.
The spec is checked whole before any run starts: unknown keys, empty grid axes, parameters the runner
does not know, values of the wrong type and, for the direct runner, impossible configs.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmscale
from lmscale.config import ConfigError, ModelConfig, TrainConfig
from lmscale.paths import repo_root, results_dir
from lmscale.results import _check_name, make_record, read_records, write_record

SPEC_KEYS = ("experiment", "runner", "fixed", "grid", "cases")
RUNNERS = ("direct", "papermill", "recall")
# The parameters that name a run, in the order of notebooks/train.py's run id.
ID_FIELDS = ("mixer", "d_model", "n_layers", "n_heads", "seq_len", "steps", "seed")
STDERR_TAIL_CHARS = 6000
CHECKPOINTS = ".checkpoints"  # <results>/<experiment>/.checkpoints/<run_id>/: unfinished direct runs


@dataclass(frozen=True)
class SweepSpec:
    """A parsed spec: ``grid`` maps each axis to its non-empty list of values; ``cases`` maps each group
    name to its list of cases, settings that vary together (e.g. sequence length with batch size, at
    equal tokens per step); a run takes one case from every group."""

    experiment: str
    runner: str
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    cases: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One point of the grid: ``params`` is every runner parameter (defaults filled in), ``point`` its grid values."""

    run_id: str
    params: dict[str, Any]
    point: dict[str, Any]
    given: tuple[str, ...]  # the parameters the spec sets (fixed and grid), the rest are defaults


@dataclass(frozen=True)
class RunOutcome:
    """What became of a run: status "ok" or "error" (ran now), "skipped" (an ok record existed),
    "running elsewhere" (another sweep holds its lock), or, in a dry run, "to run" / "to retry" (an error
    record exists)."""

    run_id: str
    status: str
    point: dict[str, Any]
    val_loss: float | None = None
    seconds: float | None = None
    record: Path | None = None


def load_spec(path: Path | str) -> SweepSpec:
    """Read and check a YAML spec; any problem raises ConfigError naming the key."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError("spec", str(path), f"cannot read the sweep spec ({e})") from e
    except yaml.YAMLError as e:
        raise ConfigError("spec", str(path), f"is not valid YAML ({e})") from e
    return parse_spec(data, str(path))


def parse_spec(data: Any, source: str = "spec") -> SweepSpec:
    """Check the spec's shape (keys, types, non-empty axes); parameter names are checked by ``expand``."""
    if not isinstance(data, dict):
        raise ConfigError("spec", source, f"must be a mapping with keys {', '.join(SPEC_KEYS)}")
    for key in data:
        if key not in SPEC_KEYS:
            raise ConfigError(str(key), data[key], f"unknown sweep spec key in {source}; valid keys: {', '.join(SPEC_KEYS)}")
    experiment = data.get("experiment")
    if not isinstance(experiment, str):
        raise ConfigError("experiment", experiment, f"{source} must name the experiment (records go to "
                                                    "data/results/<experiment>/)")
    _check_name("experiment", experiment)
    runner = data.get("runner", "direct")
    if runner not in RUNNERS:
        raise ConfigError("runner", runner, f"must be one of {', '.join(RUNNERS)}")
    fixed = data.get("fixed") or {}
    grid = data.get("grid") or {}
    for name, section in (("fixed", fixed), ("grid", grid)):
        if not isinstance(section, dict):
            raise ConfigError(name, section, "must be a mapping of parameter names to values")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise ConfigError(f"grid.{key}", values, f"must be a list of values, e.g. [{values!r}]; "
                                                     "a single value belongs in fixed")
        if not values:
            raise ConfigError(f"grid.{key}", values, "is empty: an axis needs at least one value "
                                                     "(an empty axis would make no runs)")
        if key in fixed:
            raise ConfigError(f"grid.{key}", values, "is also in fixed; give each parameter in one place")
    cases = data.get("cases") or {}
    groups = {"cases": cases} if isinstance(cases, list) else cases
    if not isinstance(groups, dict):
        raise ConfigError("cases", cases, "must be a list of cases, or a mapping of names to such lists")
    owner: dict[str, str] = {key: "fixed" for key in fixed} | {key: "grid" for key in grid}
    for name, group in groups.items():
        where = "cases" if groups is not cases else f"cases.{name}"
        if not isinstance(group, list) or not group or not all(isinstance(case, dict) and case for case in group):
            raise ConfigError(where, group, "must be a non-empty list of non-empty mappings, e.g. [{seq_len: 256, "
                                            "batch_size: 128}, {seq_len: 4096, batch_size: 8}]")
        keys = dict.fromkeys(key for case in group for key in case)
        for key in keys:
            if key in owner:
                raise ConfigError(f"{where}.{key}", [case.get(key) for case in group],
                                  f"is also in {owner[key]}; give each parameter in one place")
            owner[key] = where
    return SweepSpec(experiment=experiment, runner=runner, fixed=dict(fixed), grid=dict(grid),
                     cases={name: list(group) for name, group in groups.items()})


def run_id_for(params: Mapping[str, Any], grid_keys: list[str] | tuple[str, ...]) -> str:
    """The template's id, plus a short hash of the grid axes it does not name, so those runs stay distinct."""
    base = "{mixer}-d{d_model}-l{n_layers}-h{n_heads}-t{seq_len}-s{steps}-seed{seed}".format(**params)
    rest = {key: params[key] for key in sorted(grid_keys) if key not in ID_FIELDS}
    if not rest:
        return base
    digest = hashlib.sha1(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:8]
    return f"{base}-{digest}"


def expand(spec: SweepSpec) -> list[Run]:
    """The runs of a spec, in grid order (last axis fastest), each checked against its runner."""
    return _expand(spec, _make_runner(spec.runner))


def run_sweep(
    spec: SweepSpec,
    jobs: int = 1,
    dry_run: bool = False,
    results_root: Path | None = None,
    progress: bool = False,
) -> list[RunOutcome]:
    """Run every run of ``spec`` that has no ok record yet, ``jobs`` at a time; one outcome per run, in grid order."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError("jobs", jobs, "must be a positive integer (runs executed at once)")
    runner = _make_runner(spec.runner)
    runs = _expand(spec, runner)
    root = Path(results_root or results_dir()).resolve()
    outcomes: dict[str, RunOutcome] = {}
    todo: list[Run] = []
    for run in runs:  # read every existing record before starting anything
        path = root / spec.experiment / f"{run.run_id}.jsonl"
        record = _existing_record(path, run)
        if record is not None and record.get("status") == "ok":
            outcomes[run.run_id] = RunOutcome(run.run_id, "skipped", run.point, record["metrics"].get("val_loss"),
                                              record=path)
        elif dry_run:
            outcomes[run.run_id] = RunOutcome(run.run_id, "to retry" if record else "to run", run.point)
        else:
            todo.append(run)
    if todo:
        env = _child_env(root, jobs)
        with tempfile.TemporaryDirectory(prefix="lmscale-sweep-") as workdir, ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(_execute, run, spec.experiment, runner, env, root, Path(workdir)) for run in todo]
            try:
                for done, future in enumerate(as_completed(futures), 1):
                    outcome = future.result()
                    outcomes[outcome.run_id] = outcome
                    if progress:
                        print(f"[{done}/{len(todo)}] {outcome.run_id}: {outcome.status} ({outcome.seconds:.1f} s)",
                              file=sys.stderr, flush=True)
            except BaseException:  # Ctrl-C: start nothing new; running children got the signal too
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return [outcomes[run.run_id] for run in runs]


def format_summary(outcomes: list[RunOutcome]) -> str:
    """A plain-text table: run id, grid values, status, validation loss, seconds."""
    axes = list(dict.fromkeys(key for o in outcomes for key in o.point))
    header = ["run_id", *axes, "status", "val_loss", "seconds"]
    rows = [
        [o.run_id, *(_cell(o.point.get(a)) for a in axes), o.status,
         "-" if o.val_loss is None else f"{o.val_loss:.4f}", "-" if o.seconds is None else f"{o.seconds:.1f}"]
        for o in outcomes
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in (header, *rows)]
    counts = {s: sum(o.status == s for o in outcomes) for s in dict.fromkeys(o.status for o in outcomes)}
    lines.append(f"{len(outcomes)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# ----------------------------------------------------------------------------------------------- runners


def _in_run(e: ConfigError, run: Run) -> ConfigError:
    """The same error, naming the run it came from."""
    why = str(e).removeprefix(f"config field '{e.field}'={e.value!r}: ")
    return ConfigError(e.field, e.value, f"{why} (run {run.run_id})")


def _lmscale_command(command: str, experiment: str, run: Run) -> list[str]:
    """``python -m lmscale <command>`` with one flag per parameter the spec sets: lists comma-separated,
    mixer options as ``--mixer-option NAME=JSON``, unset values (None, an empty preset) left out."""
    argv = [sys.executable, "-m", "lmscale", command, "--experiment", experiment, "--run-id", run.run_id]
    for key in run.given:
        value, flag = run.params[key], f"--{key.replace('_', '-')}"
        if key == "mixer_options":
            argv += [arg for name, option in value.items() for arg in ("--mixer-option", f"{name}={json.dumps(option)}")]
        elif isinstance(value, list):
            argv += [flag, ",".join(map(str, value))]
        elif value is not None and not (key == "preset" and not value):
            argv += [flag, str(value)]
    return argv


class _DirectRunner:
    """``python -m lmscale train``: the parameters are ModelConfig and TrainConfig fields."""

    name = "direct"

    def __init__(self) -> None:
        self.model_fields = {f.name: _field_default(f) for f in dataclasses.fields(ModelConfig)}
        self.train_fields = {f.name: _field_default(f) for f in dataclasses.fields(TrainConfig)}
        # ``preset`` names a shape whose MLP width is solved per mixer (lmscale.presets); model fields the
        # spec sets override it, as on the command line. ``nproc`` > 1 starts the run under torchrun,
        # that many processes on this machine (one per GPU), with ``parallel`` ddp or fsdp.
        self.defaults = {"preset": "", "nproc": 1, **self.model_fields, **self.train_fields}

    def resolve(self, params: dict[str, Any], given: tuple[str, ...]) -> dict[str, Any]:
        """The parameters with a preset's model fields filled in, so run ids and checks see the real shape."""
        if not params["preset"]:
            return params
        from lmscale.presets import preset

        overrides = {k: params[k] for k in given if k in self.model_fields and k != "mixer"}
        cfg = preset(params["preset"], params["mixer"], **overrides)
        return {**params, **{k: getattr(cfg, k) for k in self.model_fields}}

    def check(self, run: Run) -> None:
        """Build what the child will build, so an impossible run fails before any run starts: the configs,
        and the model on the meta device (no memory), which checks every layer's mixer name and options;
        and the sequence length against the model's."""
        import torch

        from lmscale.model import LanguageModel

        try:
            model = ModelConfig(**{k: v for k, v in run.params.items() if k in self.model_fields})
            train = TrainConfig(**{k: v for k, v in run.params.items() if k in self.train_fields})
            nproc = run.params["nproc"]
            if not isinstance(nproc, int) or nproc < 1:
                raise ConfigError("nproc", nproc, "must be a positive integer: processes (GPUs) on this machine")
            if (nproc > 1) != (train.parallel in ("ddp", "fsdp")):
                raise ConfigError("parallel", train.parallel, f"with nproc={nproc} use " + (
                    "'ddp' or 'fsdp'" if nproc > 1 else "'none' or 'auto' (one process)"))
            if train.batch_size % nproc:
                raise ConfigError("batch_size", train.batch_size, f"must divide among nproc={nproc} processes")
            with torch.device("meta"):
                LanguageModel(model)
            if train.seq_len > model.max_seq_len:
                raise ConfigError("seq_len", train.seq_len, f"exceeds the model's max_seq_len={model.max_seq_len}")
        except ConfigError as e:
            raise _in_run(e, run) from e

    def command(self, experiment: str, run: Run, workdir: Path) -> tuple[list[str], str | None, Path]:
        nproc = run.params["nproc"]
        given = tuple(k for k in run.given if k != "nproc")
        argv = _lmscale_command("train", experiment, dataclasses.replace(run, given=given))
        if nproc > 1:  # torchrun runs ``-m lmscale train …`` in each process
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                    *argv[1:]]
        return argv, None, repo_root()


class _PapermillRunner:
    """Papermill on the jupytext template ``notebooks/train.py``: the parameters are its parameters cell's."""

    name = "papermill"

    def __init__(self, template: Path | None = None) -> None:
        missing = [m for m in ("jupytext", "papermill") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError("runner", "papermill", f"needs {' and '.join(missing)} (pip install 'lmscale[book]'); "
                                                     "or use runner: direct")
        self.template = template or repo_root() / "notebooks" / "train.py"
        proc = subprocess.run([sys.executable, "-m", "jupytext", "--to", "ipynb", str(self.template), "-o", "-"],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ConfigError("runner", "papermill", f"jupytext cannot convert {self.template}: {proc.stderr[-2000:]}")
        self.notebook = proc.stdout
        self.defaults = _parameters_cell(json.loads(self.notebook), self.template)
        self.defaults.pop("experiment", None)  # the spec's top-level experiment sets it
        lacking = [f for f in ID_FIELDS if f not in self.defaults]
        if lacking:
            raise ConfigError("runner", "papermill", f"{self.template}'s parameters cell lacks {lacking}, "
                                                     "which name its runs")

    def check(self, run: Run) -> None:
        """The template names runs by ``ID_FIELDS`` alone, so other axes would overwrite each other's record.

        The values themselves are the notebook's to check; a bad one becomes the run's error record.
        """
        for key in run.point:
            if key not in ID_FIELDS:
                raise ConfigError(f"grid.{key}", run.point[key], f"{self.template.name} names its runs by "
                                  f"{', '.join(ID_FIELDS)} alone, so runs differing in {key} would overwrite "
                                  "each other's record; vary it with runner: direct, or put it in fixed")

    def command(self, experiment: str, run: Run, workdir: Path) -> tuple[list[str], str | None, Path]:
        argv = [sys.executable, "-m", "papermill", "-", str(workdir / f"{run.run_id}.ipynb"),
                "--cwd", str(self.template.parent), "--no-progress-bar",
                "-y", json.dumps({"experiment": experiment, **{k: run.params[k] for k in run.given}})]
        return argv, self.notebook, self.template.parent


class _RecallRunner:
    """``python -m lmscale recall``: the parameters are RecallConfig fields (``lmscale.recall``)."""

    name = "recall"

    def __init__(self) -> None:
        from lmscale.recall import RecallConfig

        self.config = RecallConfig
        self.defaults = {f.name: _field_default(f) for f in dataclasses.fields(RecallConfig)}

    def check(self, run: Run) -> None:
        """Build the config and the model on the meta device, as the child will."""
        from lmscale.recall import state_bytes

        try:
            cfg = self.config(**run.params)
            state_bytes(cfg.model_config, cfg.prompt_len)
        except ConfigError as e:
            raise _in_run(e, run) from e

    def command(self, experiment: str, run: Run, workdir: Path) -> tuple[list[str], str | None, Path]:
        return _lmscale_command("recall", experiment, run), None, repo_root()


def _make_runner(name: str) -> _DirectRunner | _PapermillRunner | _RecallRunner:
    return {"direct": _DirectRunner, "papermill": _PapermillRunner, "recall": _RecallRunner}[name]()


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _parameters_cell(notebook: dict[str, Any], where: Path) -> dict[str, Any]:
    """Names and literal defaults of the cell tagged ``parameters``, as papermill sees it."""
    for cell in notebook["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            return {
                node.targets[0].id: ast.literal_eval(node.value)
                for node in ast.parse(source).body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            }
    raise ConfigError("runner", "papermill", f"{where} has no cell tagged 'parameters'")


# ------------------------------------------------------------------------------------------- expansion


def _expand(spec: SweepSpec, runner: _DirectRunner | _PapermillRunner | _RecallRunner) -> list[Run]:
    sections = [("fixed", spec.fixed), ("grid", spec.grid),
                *((f"cases.{name}[{i}]", case) for name, group in spec.cases.items() for i, case in enumerate(group))]
    for section, values in sections:
        for key, value in values.items():
            if key not in runner.defaults:
                hint = " (set it at the top level of the spec)" if key == "experiment" else ""
                raise ConfigError(f"{section}.{key}", value, f"not a parameter of the {runner.name} runner{hint}; "
                                                            f"valid: {', '.join(sorted(runner.defaults))}")
            for item in value if section == "grid" else [value]:
                _check_type(f"{section}.{key}", item, runner.defaults[key])
    axes = list(dict.fromkeys([*spec.grid, *(key for group in spec.cases.values() for case in group for key in case)]))
    given = tuple(dict.fromkeys([*spec.fixed, *axes]))
    runs, seen = [], {}
    for values, cases in itertools.product(itertools.product(*spec.grid.values()),
                                           itertools.product(*spec.cases.values())):
        point = {**dict(zip(spec.grid, values)), **{k: v for case in cases for k, v in case.items()}}
        params = {**runner.defaults, **spec.fixed, **point}
        if isinstance(runner, _DirectRunner):
            params = runner.resolve(params, given)
        run_id = run_id_for(params, axes)
        _check_name("run_id", run_id)
        if run_id in seen:
            raise ConfigError("grid", point, f"gives the same run id {run_id!r} as {seen[run_id]}; "
                                             "remove the repeated value")
        seen[run_id] = point
        run = Run(run_id=run_id, params=params, point=point, given=given)
        runner.check(run)
        runs.append(run)
    return runs


def _check_type(field_name: str, value: Any, default: Any) -> None:
    """Values must have their default's type (ints count as floats); None defaults are left to the configs."""
    if default is None:
        return
    expected: tuple[type, ...] = (int, float) if type(default) is float else (type(default),)
    if isinstance(value, expected) and not (isinstance(value, bool) and type(default) is not bool):
        return
    hint = ""
    if isinstance(value, str) and type(default) in (int, float):
        hint = "; YAML reads 1e-3 as text, write 1.0e-3"
    raise ConfigError(field_name, value, f"must be a {type(default).__name__} like the default {default!r}{hint}")


# ------------------------------------------------------------------------------------------- execution


def _existing_record(path: Path, run: Run) -> dict[str, Any] | None:
    """The run's record if there is one; an ok record whose config contradicts the spec is an error, not a skip."""
    record = _last_record(path)
    if record is None or record.get("status") != "ok":
        return record
    clash = _disagreement(record, run)
    if clash:
        key, stored = clash
        raise ConfigError(key, run.params[key], f"{path} holds a finished run with {key}={stored!r} under "
                                                "the same run id, which would be skipped; delete that record "
                                                "or use another experiment name")
    return record


def _disagreement(record: dict[str, Any], run: Run) -> tuple[str, Any] | None:
    """The first parameter the spec sets that a train record holds with another value, and that value."""
    config = record["config"]
    stored = {**config.get("model", {}), **config.get("train", {})}
    for key in run.given:
        if key in stored and stored[key] != run.params[key]:
            return key, stored[key]
    return None


def _last_record(path: Path) -> dict[str, Any] | None:
    records = read_records(path) if path.is_file() else []
    return records[-1] if records else None


def _child_env(root: Path, jobs: int) -> dict[str, str]:
    """Children import this lmscale and write to this results folder; parallel runs get one thread each."""
    env = dict(os.environ, LMSCALE_RESULTS=str(root))
    src = str(Path(lmscale.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = "1"
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines (NCCL under torchrun)
    return env


@contextlib.contextmanager
def run_lock(root: Path, experiment: str, run_id: str) -> Iterator[int | None]:
    """Hold ``<root>/<experiment>/.locks/<run_id>.lock`` while a run executes; yields its file descriptor,
    or None when another process holds it. An OS lock (flock) belongs to the open file, so it dies with
    every process that has the descriptor: the run's child inherits it, and a sweep killed with SIGKILL
    leaves the lock held until its orphaned child is done, never longer."""
    import fcntl

    folder = root / experiment / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{run_id}.lock", "a+") as handle:  # flock locks the open descriptor
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        try:
            yield handle.fileno()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _execute(run: Run, experiment: str, runner: _DirectRunner | _PapermillRunner | _RecallRunner, env: dict[str, str],
             root: Path, workdir: Path) -> RunOutcome:
    """Run one child process unless another sweep is running or has finished it (two sweeps of one spec
    share the work); whatever goes wrong becomes an error record, never an exception."""
    with run_lock(root, experiment, run.run_id) as lock:
        if lock is None:
            return RunOutcome(run.run_id, "running elsewhere", run.point, seconds=0.0)
        record = _last_record(root / experiment / f"{run.run_id}.jsonl")
        if record is not None and record.get("status") == "ok":  # finished by another sweep since we looked
            return RunOutcome(run.run_id, "skipped", run.point, record["metrics"].get("val_loss"), 0.0,
                              root / experiment / f"{run.run_id}.jsonl")
        return _execute_locked(run, experiment, runner, env, root, workdir, lock)


def _execute_locked(run: Run, experiment: str, runner: _DirectRunner | _PapermillRunner | _RecallRunner,
                    env: dict[str, str], root: Path, workdir: Path, lock: int) -> RunOutcome:
    path = root / experiment / f"{run.run_id}.jsonl"
    checkpoints = root / experiment / CHECKPOINTS / run.run_id
    argv: list[str] = []
    start = time.perf_counter()
    try:
        argv, stdin, cwd = runner.command(experiment, run, workdir)
        if runner.name == "direct":  # an interrupted try left its checkpoint: continue from it
            argv += ["--out-dir", str(checkpoints)] + (["--resume"] if (checkpoints / "checkpoint.pt").is_file() else [])
        proc = subprocess.run(argv, input=stdin, cwd=cwd, env=env, capture_output=True, text=True, check=False,
                              pass_fds=(lock,))  # the child holds the run's lock too
        seconds = time.perf_counter() - start
        record = _last_record(path)
        finished = proc.returncode == 0 and record is not None and record.get("status") == "ok"
        clash = _disagreement(record, run) if finished else None
        if finished and not clash:
            shutil.rmtree(checkpoints, ignore_errors=True)  # the record holds what the run is for
            return RunOutcome(run.run_id, "ok", run.point, record["metrics"].get("val_loss"), seconds, path)
        if clash:  # e.g. a flag the command line parses otherwise than the spec means it
            reason = (f"the run trained with {clash[0]}={clash[1]!r} where the spec asks {run.params[clash[0]]!r}; "
                      f"the {runner.name} runner did not pass {clash[0]} through")
        elif proc.returncode == 0:
            reason = (f"the {runner.name} runner exited cleanly but wrote no record at {path}; "
                      "does it name its runs as the sweep does?")
        else:
            reason = f"exited with code {proc.returncode}"
        tail = (proc.stderr or proc.stdout)[-STDERR_TAIL_CHARS:]
    except (OSError, ValueError, subprocess.SubprocessError):  # cannot start it, or its record is unreadable
        seconds = time.perf_counter() - start
        reason, tail = "could not be run", traceback.format_exc()[-STDERR_TAIL_CHARS:]
    error = {"reason": reason, "stderr_tail": tail, "command": shlex.join(argv), "seconds": seconds}
    record = make_record(experiment, kind="train", config={"runner": runner.name, "params": run.params},
                         seed=run.params["seed"], metrics={}, run_id=run.run_id, device=run.params.get("device"),
                         status="error", extra={"error": error})
    return RunOutcome(run.run_id, "error", run.point, None, seconds, write_record(record, root))

