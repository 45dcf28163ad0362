"""Reports over finished runs: a table (Markdown and CSV) of final metrics and PNG plots.

    runs = load_runs("runs/rank")                    # every run workdir under the directory
    paths = write_report(runs, "runs/rank")          # report.md, report.csv, *.png

A run is a directory holding ``summary.json`` (written by the trainer when a run completes),
``metrics.jsonl`` (its loss curves) and, for sweep points, ``overrides.json`` (the swept values,
written by ``lora_jax.sweep``). Runs launched without the sweep (``--print_commands``) have no
``overrides.json``; their axes are the config fields that differ between the runs' ``run.json``.
A missing or corrupt file is reported by name and that run (or line) is left out; the rest still
report. Flags live in ``experiments/report.py``; nothing here trains or launches.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from lora_jax.sweep import format_value, short_keys

_REQUIRED = ("method", "trainable_params", "steps", "train_seconds", "final_eval_loss", "accuracy",
             "tokens_per_sec")
_SKIP_DIRS = {"checkpoints", "tb", "adapter"}


@dataclasses.dataclass
class Run:
    """One finished run: ``name`` (its path under the root), summary, swept values, loss curves."""

    name: str
    workdir: Path
    summary: dict
    overrides: dict
    curves: dict  # 'train' | 'eval' -> [(step, loss), ...]


def find_run_dirs(root: str | os.PathLike) -> list[Path]:
    """Directories under ``root`` (itself included) that hold a run's files, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        if {"summary.json", "run.json", "overrides.json", "metrics.jsonl"} & set(filenames):
            found.append(Path(dirpath))
    return sorted(found)


def _read_json(path: Path, warn: Callable[[str], None]) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        warn(f"{path}: missing")
    except (OSError, ValueError) as e:
        warn(f"{path}: unreadable or not valid JSON ({e})")
    return None


def read_curves(path: Path, warn: Callable[[str], None]) -> dict:
    """``metrics.jsonl`` -> ``{'train': [(step, loss)], 'eval': [...]}``; bad lines are reported."""
    curves = {"train": [], "eval": []}
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        warn(f"{path}: unreadable ({e}); no loss curve for this run")
        return curves
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            curves.setdefault(rec["split"], []).append((int(rec["step"]), float(rec["loss"])))
        except (ValueError, KeyError, TypeError):
            warn(f"{path}:{i}: not a metrics record ({line[:60]!r}); line ignored")
    return curves


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def load_runs(root: str | os.PathLike, warn: Callable[[str], None] = print) -> list[Run]:
    """Every complete run under ``root``; what cannot be read is reported through ``warn``."""
    root, runs, configs = Path(root), [], {}
    for workdir in find_run_dirs(root):
        path = workdir / "summary.json"
        if not path.exists():
            warn(f"{path}: missing (the run is unfinished or failed); left out")
            continue
        summary = _read_json(path, warn)
        if not isinstance(summary, dict):
            warn(f"{path}: not a run summary; left out")
            continue
        lacking = [k for k in _REQUIRED if k not in summary]
        if lacking:
            warn(f"{path}: lacks {', '.join(lacking)}; left out")
            continue
        overrides = None
        if (workdir / "overrides.json").exists():
            record = _read_json(workdir / "overrides.json", warn)
            overrides = record.get("overrides") if isinstance(record, dict) else None
        if overrides is None and (workdir / "run.json").exists():
            configs[len(runs)] = _flatten(_read_json(workdir / "run.json", warn) or {})
        name = str(workdir.relative_to(root)) if workdir != root else workdir.name
        runs.append(Run(name, workdir, summary, overrides or {},
                        read_curves(workdir / "metrics.jsonl", warn)))
    if len(configs) > 1:  # runs without overrides.json: their axes are the fields that differ
        keys = sorted({k for c in configs.values() for k in c})
        varying = [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1]
        for i, config in configs.items():
            runs[i].overrides = {k: config.get(k) for k in varying}
    return runs


def axes_of(runs: list[Run]) -> list[str]:
    """The swept keys, in order of first appearance."""
    return list(dict.fromkeys(k for r in runs for k in r.overrides))


def _sort_key(value: Any):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return (1, 0.0, str(value))
    return (0, float(value), "")


def table(runs: list[Run]) -> tuple[list[str], list[list[Any]]]:
    """``(columns, rows)`` of raw values: run, the axes, method, params, metrics, throughput."""
    axes = axes_of(runs)
    short = short_keys([{k: None for k in axes}])
    tasks = list(dict.fromkeys(t for r in runs for t in r.summary["accuracy"] if t != "mean"))
    method = [] if "method" in axes else ["method"]  # a swept method is already an axis column
    columns = (["run"] + [short[a] for a in axes] +
               method + ["steps", "trainable params", "eval loss", "acc (mean)"] +
               [f"acc {t}" for t in tasks] + ["base acc (mean)", "tokens/s", "train s"])
    rows = []
    for r in sorted(runs, key=lambda r: ([_sort_key(r.overrides.get(a)) for a in axes], r.name)):
        s, acc = r.summary, r.summary["accuracy"]
        rows.append([r.name] + [r.overrides.get(a, "") for a in axes] +
                    [s["method"]] * len(method) +
                    [s["steps"], s["trainable_params"], s["final_eval_loss"],
                     acc.get("mean", math.nan)] + [acc.get(t, math.nan) for t in tasks] +
                    [s.get("base_accuracy", {}).get("mean", math.nan), s["tokens_per_sec"],
                     s["train_seconds"]])
    return columns, rows


def _cell(column: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return format_value(value) if value != "" else "–"
    if column == "trainable params":
        return f"{value:,}"
    if column == "eval loss":
        return f"{value:.4f}"
    if column.startswith(("acc", "base acc")):
        return f"{value:.3f}"
    if column == "tokens/s":
        return f"{value:,.0f}"
    if column == "train s":
        return f"{value:.1f}"
    return format_value(value)


def to_markdown(columns: list[str], rows: list[list[Any]]) -> str:
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows)
               for i in range(len(columns))]
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_cell(c, v) for c, v in zip(columns, row)) + " |" for row in rows]
    return "\n".join(lines)


def to_csv(columns: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", name)


def plot_loss_curves(runs: list[Run], path: Path) -> Path:
    """Train and eval loss against step, one line per run."""
    plt = _pyplot()
    fig, axs = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80, sharey=True)
    for r in runs:
        for ax, split in zip(axs, ("train", "eval")):
            pts = sorted(r.curves.get(split, []))
            if pts:
                ax.plot(*zip(*pts), marker="." if split == "eval" else None, lw=1, label=r.name)
    for ax, split in zip(axs, ("train", "eval")):
        ax.set(title=f"{split} loss", xlabel="step")
        ax.grid(alpha=0.3)
    axs[0].set_ylabel("loss")
    axs[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_axis(runs: list[Run], axis: str, label: str, path: Path) -> Path:
    """Eval loss and mean accuracy against ``axis``; one line per setting of the other axes."""
    plt = _pyplot()
    others = [a for a in axes_of(runs) if a != axis]
    short = short_keys([{k: None for k in axes_of(runs)}])
    values = sorted({r.overrides[axis] for r in runs if axis in r.overrides}, key=_sort_key)
    numeric = all(_sort_key(v)[0] == 0 for v in values)
    position = {v: (v if numeric else i) for i, v in enumerate(values)}
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if axis in r.overrides:
            groups.setdefault(tuple(format_value(r.overrides.get(a, "–")) for a in others),
                              []).append(r)
    fig, axs = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for key, members in groups.items():
        members.sort(key=lambda r: _sort_key(r.overrides[axis]))
        xs = [position[r.overrides[axis]] for r in members]
        name = ", ".join(f"{short[a]}={v}" for a, v in zip(others, key)) or label
        for ax, metric in zip(axs, ("loss", "acc")):
            ys = [r.summary["final_eval_loss"] if metric == "loss"
                  else r.summary["accuracy"].get("mean", math.nan) for r in members]
            ax.plot(xs, ys, marker="o", lw=1 if numeric else 0, label=name)
    for ax, title in zip(axs, ("final eval loss", "mean accuracy")):
        ax.set(title=title, xlabel=label)
        ax.grid(alpha=0.3)
        if numeric and min(values) > 0 and max(values) / min(values) >= 8:
            ax.set_xscale("log", base=2)
            ax.set_xticks(values, [format_value(v) for v in values])
        elif not numeric:
            ax.set_xticks(range(len(values)), [format_value(v) for v in values])
    if len(groups) > 1:
        axs[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(runs: list[Run], out: str | os.PathLike, title: str = "Report",
                 notes: list[str] = ()) -> dict:
    """Writes ``report.md``, ``report.csv``, ``loss_curves.png`` and one ``vs_<axis>.png`` per axis
    with two or more values into ``out``; returns ``{'markdown', 'table', 'files'}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = table(runs)
    markdown = to_markdown(columns, rows)
    (out / "report.csv").write_text(to_csv(columns, rows))
    files = [out / "report.csv", plot_loss_curves(runs, out / "loss_curves.png")]
    axes = axes_of(runs)
    short = short_keys([{k: None for k in axes}])
    for axis in axes:
        if len({repr(r.overrides.get(axis)) for r in runs if axis in r.overrides}) > 1:
            files.append(plot_axis(runs, axis, short[axis], out / f"vs_{_safe(short[axis])}.png"))
    text = [f"# {title}", "", f"{len(runs)} runs.", "", markdown, ""]
    if notes:
        text += ["Left out or partly read:", ""] + [f"- {n}" for n in notes] + [""]
    text += [f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png"]
    (out / "report.md").write_text("\n".join(text) + "\n")
    files.insert(0, out / "report.md")
    return {"markdown": markdown, "table": (columns, rows), "files": files}
