"""Ablation sweeps: every point of a config's ``get_sweep(arg)``, each trained by its own
``python -m experiments.train`` process in a sub-workdir named from the point's overrides.

    points = load_sweep("configs/lora.py:small")        # [{'adapter.rank': 1, ...}, ...]
    plan = plan_points(points, "runs/rank")              # names checked unique before anything runs
    result = run_sweep("configs/lora.py:small", plan, parallel=1)

One path for sequential and parallel runs (a pool of subprocesses of size ``parallel``), so a crash
of one point cannot take the sweep down. Before anything runs, each point's resolved config is
compared with the ``run.json`` in its workdir (``stale_fields``): a point whose config differs (the
shared flags changed between two runs of the sweep, say) is refused with the differing fields named
and is never skipped as complete; use a new ``--workdir`` or the original flags. A point whose
``summary.json`` exists (and whose config matches) is skipped; an interrupted one resumes (the
trainer restores its newest checkpoint). SIGTERM or Ctrl-C to the sweep is forwarded as SIGTERM to
the running points, which checkpoint and stop; a point that the forwarded SIGTERM killed (exit -15,
e.g. during its start-up) counts as interrupted too, not failed. Each point's workdir gets
``overrides.json`` (what the report reads its axes from) and ``train.log`` (the process output).
Flags live in ``experiments/sweep.py``; tables and plots over the finished runs in
``lora_jax/report.py``. With ``--batched``, points that can share one job (``lora_jax.train.batched.
plan_groups``) train in-process as groups (``run_groups``), each point still in its own workdir;
the rest run as above, and the sweep logs why each of them trains solo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point: its sub-workdir ``name`` and the dotted ``overrides`` that define it."""

    name: str
    overrides: dict
    workdir: Path


@dataclasses.dataclass
class SweepResult:
    """Names of the points by outcome; ``failed`` maps a name to the reason."""

    done: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    interrupted: list = dataclasses.field(default_factory=list)
    failed: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


def load_sweep(config: str) -> list[dict]:
    """``'configs/lora.py:small'`` -> that file's ``get_sweep('small')`` (a list of dicts)."""
    path, _, arg = config.partition(":")
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{Path(path).stem}", path)
    if spec is None or not Path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} defines no get_sweep(arg); add one returning a list of "
                         "{'dotted.key': value} dicts")
    points = module.get_sweep(arg)
    if not points or not all(isinstance(p, dict) for p in points):
        raise ValueError(f"{path}: get_sweep({arg!r}) must return a non-empty list of dicts, "
                         f"got {points!r:.200}")
    return points


def format_value(value: Any) -> str:
    """A value as ``--config.key=`` text: ``True``, ``0.001``, ``all-linear``, ``('a', 'b')``.

    Floats are short (``3e-04`` as ``0.0003``) unless that would change them."""
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    if isinstance(value, float):
        return f"{value:g}" if float(f"{value:g}") == value else repr(value)
    return str(value)


def short_keys(points: Sequence[dict]) -> dict[str, str]:
    """Dotted key -> its leaf name, or the full key where two swept keys share a leaf."""
    keys = sorted({k for p in points for k in p})
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def point_name(overrides: dict, short: dict[str, str] | None = None) -> str:
    """``{'adapter.rank': 4, 'adapter.targets': 'qv'}`` -> ``'rank=4_targets=qv'``.

    Keys in the dict's order, shortened by ``short``; characters outside ``[A-Za-z0-9._+=-]`` become
    ``-``; an over-long name is cut and suffixed with a hash. ``{}`` is ``'default'``.
    """
    short = short or {}
    parts = [f"{short.get(k, k)}={format_value(v)}" for k, v in overrides.items()]
    name = _UNSAFE.sub("-", "_".join(parts)) or "default"
    if len(name) > 120:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:100]}-{digest}"
    return name


def plan_points(points: Sequence[dict], workdir: str | os.PathLike) -> list[Point]:
    """Names every point; two points that would share a sub-workdir are an error, raised here."""
    short = short_keys(points)
    plan, seen = [], {}
    for i, overrides in enumerate(points):
        name = point_name(overrides, short)
        if name in seen:
            j = seen[name]
            raise ValueError(
                f"sweep points {j} {points[j]!r} and {i} {overrides!r} would share the sub-workdir "
                f"{name!r}; make their overrides differ in more than characters outside "
                "[A-Za-z0-9._+=-]")
        seen[name] = i
        plan.append(Point(name, dict(overrides), Path(workdir) / name))
    return plan


def launch_command(config: str, point: Point, extra_flags: Sequence[str] = (),
                   python: str = "python") -> list[str]:
    """The ``experiments.train`` argv for ``point``: shared ``extra_flags``, then its overrides."""
    flags = [f"--config.{k}={format_value(v)}" for k, v in point.overrides.items()]
    return [python, "-m", "experiments.train", f"--config={config}",
            f"--workdir={point.workdir}", *extra_flags, *flags]


def format_command(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _write_overrides(point: Point, config: str) -> None:
    """Creates the point's workdir with ``overrides.json``; a different record there is an error."""
    point.workdir.mkdir(parents=True, exist_ok=True)
    path = point.workdir / "overrides.json"
    record = json.loads(json.dumps({"config": config, "name": point.name,
                                    "overrides": point.overrides}))
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("overrides") != record["overrides"]:
            raise ValueError(f"{path} records overrides {old.get('overrides')!r}, not "
                             f"{record['overrides']!r}; use a new --workdir")
    else:
        path.write_text(json.dumps(record, indent=1))


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def stale_fields(workdir: Path, identity: dict) -> list[str]:
    """The fields where ``<workdir>/run.json`` differs from ``identity`` (the resolved config, as
    the trainer records it), as ``'train.steps: 60 on disk, 80 now'``; ``[]`` if they agree or
    there is no ``run.json`` yet.

    Only the identity's fields are compared: what ``run.json`` records besides them (versions,
    data digests) is the trainer's to check. An unreadable ``run.json`` is one difference.
    """
    path = Path(workdir) / "run.json"
    if not path.exists():
        return []
    try:
        disk = _flat(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        return [f"run.json unreadable ({e})"]
    now = _flat(json.loads(json.dumps(identity, default=str)))
    missing = object()
    return [f"{k}: {'absent' if disk.get(k, missing) is missing else repr(disk[k])} on disk, "
            f"{v!r} now" for k, v in now.items() if disk.get(k, missing) != v]


def _has_checkpoint(workdir: Path) -> bool:
    return any((workdir / "checkpoints").glob("[0-9]*"))


def outcome(returncode: int, has_summary: bool, stopping: bool) -> str:
    """``'done'``, ``'interrupted'`` (resumable) or ``'failed'``: how a point's process ended.

    Exit 0 without a summary is the trainer's checkpoint-and-stop; exit -15 (SIGTERM's default
    action) after the sweep itself was told to stop is a point the forwarded SIGTERM caught
    before its handler was installed (start-up), which resumes like any other.
    """
    if returncode == 0:
        return "done" if has_summary else "interrupted"
    if stopping and returncode == -signal.SIGTERM:
        return "interrupted"
    return "failed"


def _die_with_parent() -> None:
    """In the child: receive SIGTERM (checkpoint and stop) if the sweep process dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _log_tail(path: Path, n: int = 6) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + l for l in lines[-n:])


class _StopRequest:
    """SIGTERM / SIGINT to the sweep: stop launching and forward SIGTERM to the running points."""

    def __init__(self):
        self.requested, self.procs, self.previous = False, {}, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no forwarding
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run_sweep(config: str, plan: Sequence[Point], *, extra_flags: Sequence[str] = (),
              parallel: int = 1, validate: Callable[[dict], Any] | None = None,
              identity: Callable[[dict], dict] | None = None, env: dict | None = None,
              log: Callable[[str], None] = print, poll_seconds: float = 0.2) -> SweepResult:
    """Runs the points not yet complete, at most ``parallel`` at a time; returns the outcomes.

    ``validate(overrides)`` (e.g. ``apply_overrides`` on the config) runs first for every point; a
    point it rejects is a failure and is not launched, the others still run. ``identity(overrides)``
    is the point's resolved config as the trainer records it in ``run.json``; a point whose
    ``run.json`` differs from it is a failure naming the fields (``stale_fields``), complete or
    not. The run's output goes to ``<point>/train.log``; a non-zero exit is a failure reported with
    the log's tail (``outcome``).
    """
    result, queue = SweepResult(), []
    for point in plan:
        try:
            if validate is not None:
                validate(point.overrides)
            stale = stale_fields(point.workdir, identity(point.overrides)) if identity else []
            if stale:
                raise ValueError(
                    f"{point.workdir / 'run.json'} records another config ({'; '.join(stale[:4])}"
                    f"{'; ...' if len(stale) > 4 else ''}); use a new --workdir, or the flags "
                    "of the first run to resume it")
            if (point.workdir / "summary.json").exists():
                log(f"[skip] {point.name}: complete ({point.workdir / 'summary.json'})")
                result.skipped.append(point.name)
                continue
            _write_overrides(point, config)
        except Exception as e:  # noqa: BLE001 -- any bad point is reported, the rest still run
            reason = f"{type(e).__name__}: {e}".replace("\n", " ")
            log(f"[fail] {point.name}: {reason}")
            result.failed[point.name] = reason
            continue
        queue.append(point)

    python, by_name, began = sys.executable, {p.name: p for p in queue}, {}
    total, started = len(queue), 0
    with _StopRequest() as stop:
        running = stop.procs  # name -> Popen
        while (queue and not stop.requested) or running:
            while queue and len(running) < max(parallel, 1) and not stop.requested:
                point = queue.pop(0)
                started += 1
                argv = launch_command(config, point, extra_flags, python)
                resume = _has_checkpoint(point.workdir)
                log(f"[{started}/{total}] {'resume' if resume else 'start'} {point.name}: "
                    f"{format_command(argv[3:])}")
                with (point.workdir / "train.log").open("ab") as out:
                    running[point.name] = subprocess.Popen(
                        argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                        start_new_session=True, preexec_fn=_die_with_parent)
                began[point.name] = time.time()
            for name, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                point, seconds = by_name[name], time.time() - began[name]
                end = outcome(proc.returncode, (point.workdir / "summary.json").exists(),
                              stop.requested)
                if end == "done":
                    log(f"[done] {name} in {seconds:.0f} s")
                    result.done.append(name)
                elif end == "interrupted":
                    what = "SIGTERM"
                    if proc.returncode == 0:  # the trainer's own stop: saved, or nothing to save
                        what = ("checkpointed" if _has_checkpoint(point.workdir)
                                else "stopped before its first checkpoint")
                    log(f"[stopped] {name}: {what}; rerun the sweep to resume it")
                    result.interrupted.append(name)
                else:
                    reason = (f"exit code {proc.returncode}; see {point.workdir / 'train.log'}:\n"
                              + _log_tail(point.workdir / "train.log"))
                    log(f"[fail] {name}: {reason}")
                    result.failed[name] = reason
            if running:
                time.sleep(poll_seconds)
        if stop.requested:
            for point in queue:
                result.interrupted.append(point.name)
            if queue:
                log(f"stopped before starting {len(queue)} point(s); rerun the sweep to run them")
    return result


def run_groups(config: str, plan: Sequence[Point], groups: Sequence[Sequence[int]],
               train_group: Callable[[list[int]], list[dict]], *,
               identity: Callable[[dict], dict] | None = None,
               log: Callable[[str], None] = print) -> SweepResult:
    """Runs each group of point indices as one batched job, in this process.

    ``train_group(indices)`` trains those points together (``lora_jax.train.batched.train_group``
    on their configs and workdirs) and returns one summary per point (``{'diverged': True,
    'reason': ...}`` for a point stopped alone, which is a failure here; ``{'interrupted': True,
    'step': N}`` after SIGTERM, resumable). Complete points are
    skipped, a point whose ``run.json`` records another config fails (``stale_fields``), and an
    exception fails the whole group with its message; the other groups still run.
    """
    result = SweepResult()
    for n, members in enumerate(groups, 1):
        todo = []
        for i in members:
            point = plan[i]
            stale = stale_fields(point.workdir, identity(point.overrides)) if identity else []
            if stale:
                result.failed[point.name] = (f"{point.workdir / 'run.json'} records another "
                                             f"config ({'; '.join(stale[:4])}); use a new "
                                             "--workdir")
                log(f"[fail] {point.name}: {result.failed[point.name]}")
            elif (point.workdir / "summary.json").exists():
                log(f"[skip] {point.name}: complete ({point.workdir / 'summary.json'})")
                result.skipped.append(point.name)
            else:
                _write_overrides(point, config)
                todo.append(i)
        if not todo:
            continue
        names = [plan[i].name for i in todo]
        log(f"[group {n}/{len(groups)}] {len(todo)} points in one job: {', '.join(names)}")
        began = time.time()
        try:
            summaries = train_group(todo)
        except Exception as e:  # noqa: BLE001 -- a failed group fails its points, not the sweep
            reason = f"batched group failed: {type(e).__name__}: {e}".replace("\n", " ")
            for name in names:
                result.failed[name] = reason
            log(f"[fail] group {n}: {reason}")
            continue
        for i, summary in zip(todo, summaries):
            name = plan[i].name
            if summary.get("interrupted"):
                result.interrupted.append(name)
                log(f"[stopped] {name}: checkpointed at step {summary['step']}; rerun the sweep "
                    "to resume it")
            elif summary.get("diverged"):
                result.failed[name] = summary["reason"]
                log(f"[fail] {name}: {summary['reason']}")
            else:
                result.done.append(name)
        log(f"[done] group {n} ({len(todo)} points) in {time.time() - began:.0f} s")
    return result


def merge_results(*results: SweepResult) -> SweepResult:
    """One ``SweepResult`` holding every outcome of ``results``."""
    out = SweepResult()
    for r in results:
        out.done += r.done
        out.skipped += r.skipped
        out.interrupted += r.interrupted
        out.failed.update(r.failed)
    return out
