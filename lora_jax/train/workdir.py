"""The workdir's small files and guards: atomic JSON, a one-run-at-a-time lock, data digests, and
the environment a run records.

``write_json`` writes through a temporary file, ``fsync`` and ``os.replace``, so a kill leaves
either the old file or the new one, never a torn one, and it refuses NaN/inf (which would make
invalid JSON) with the key named. ``read_json`` turns an empty or truncated file into a one-line
error that says what to do. ``WorkdirLock`` holds an ``fcntl.flock`` on ``<workdir>/.lock.<i>``
for process ``i``; the kernel drops it when the holder dies, so a stale lock file never blocks;
with ``wait=True`` a second process waits for it instead (the pretrained-base cache does that).
``file_digest``/``check_data_unchanged`` pin the content of data files, and ``environment`` says
which code and machine produced a run. Checkpoints live in ``checkpoint.py``; what the trainer
does with these pieces lives in ``trainer.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from lora_jax.io import atomic_write, read_json  # read_json: re-exported for the trainer


def _plain(x: Any) -> Any:
    """``json.dumps`` default: numpy scalars and arrays become Python values."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable: {x!r}")


def _first_nonfinite(obj: Any, path: str = "") -> str | None:
    """The dotted key of the first NaN/inf float in ``obj`` (plain JSON values), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "<top level>"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = _first_nonfinite(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically; raises ``ValueError`` on NaN/inf values.

    Numpy scalars and arrays are written as numbers and lists.
    """
    plain = json.loads(json.dumps(obj, default=_plain))  # numpy -> Python; NaN survives here
    bad = _first_nonfinite(plain)
    if bad:
        raise ValueError(f"refusing to write {path}: {bad} is not finite (NaN or inf is not valid "
                         "JSON); fix the value or leave the key out")
    atomic_write(Path(path), (json.dumps(plain, indent=1, allow_nan=False) + "\n").encode())


# ----------------------------------------------------------------------------- the lock


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds ``<workdir>/.lock.<process_index>`` exclusively.

    The lock is an ``fcntl.flock`` on an open file, so it is released by the kernel when the
    holder exits or is killed: a lock file left by a dead process is simply re-acquired (the
    file's pid/host text is informational). Each process of a multi-process run locks its own
    index, so a second launch fails on every process. ``flock`` works across hosts on NFSv4 and
    Lustre; on file systems without it (some FUSE mounts) the lock is per host only.

    ``name`` locks ``<workdir>/.lock.<name>.<process_index>`` instead: a second lock on the same
    directory for another purpose (the base-model cache locks its folder while
    ``train_and_evaluate`` inside it holds the run's own lock). ``wait=True`` waits for a busy
    lock instead of raising ``WorkdirBusy``, polling every ``poll_s`` seconds; ``log`` (if given)
    gets one line naming the holder when the wait starts.
    """

    def __init__(self, workdir: str | os.PathLike, process_index: int = 0, *,
                 name: str = "", wait: bool = False, poll_s: float = 0.2,
                 log: Callable[[str], None] | None = None):
        self.workdir = Path(workdir)
        self.path = self.workdir / (f".lock.{name}.{process_index}" if name
                                    else f".lock.{process_index}")
        self.wait, self.poll_s, self.log = wait, poll_s, log
        self.fd: int | None = None

    def holder(self, fd: int) -> tuple[str, str]:
        """``(pid, host)`` written by the lock's holder (``'?'`` where unknown)."""
        text = os.pread(fd, 512, 0).decode(errors="replace").split()
        return tuple((text + ["?", "?"])[:2])

    def __enter__(self) -> "WorkdirLock":
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        polls, logged = 0, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid, host = self.holder(fd)
                if not self.wait:
                    os.close(fd)
                    raise WorkdirBusy(f"workdir {self.workdir} is in use by pid {pid} on host "
                                      f"{host}; stop it or use another --workdir") from None
                # The holder writes its pid just after locking: name it once it is there.
                if not logged and self.log is not None and (pid != "?" or polls >= 25):
                    self.log(f"waiting for pid {pid} on host {host}, which holds {self.path}")
                    logged = True
                polls += 1
                time.sleep(self.poll_s)
        text = f"{os.getpid()} {socket.gethostname()}\n".encode()
        os.pwrite(fd, text, 0)
        os.ftruncate(fd, len(text))
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock; the file stays (unlinking it would race)
            self.fd = None


# ----------------------------------------------------------------------------- data digests


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """``'sha256:<hex>'`` of the file's bytes, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def data_digests(paths) -> dict[str, str]:
    """``{str(path): file_digest(path)}`` for each data file (to record in ``run.json``)."""
    return {str(p): file_digest(p) for p in paths}


def check_data_unchanged(recorded: Mapping[str, str], allow_change: bool = False) -> list[str]:
    """Compares files with the digests ``data_digests`` recorded; returns the changes.

    Raises ``ValueError`` (one line, first change) unless ``allow_change``; then the caller
    should log the returned lines.
    """
    changes = []
    for path, digest in recorded.items():
        now = file_digest(path) if Path(path).is_file() else "missing"
        if now != digest:
            changes.append(f"train data changed since the run started: {path} "
                           f"({digest[:19]}… then, {now[:19]}… now)")
    if changes and not allow_change:
        more = f" (and {len(changes) - 1} more file(s))" if len(changes) > 1 else ""
        raise ValueError(f"{changes[0]}{more}; pass --config.train.allow_data_change=True to continue")
    return changes


# ----------------------------------------------------------------------------- environment


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict:
    """``{'version', 'git_commit', 'git_dirty'}`` of this lora_jax; git fields None outside a
    checkout (e.g. an installed wheel)."""
    try:
        version = importlib.metadata.version("lora_jax")
    except importlib.metadata.PackageNotFoundError:
        version = None
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    return {"version": version, "git_commit": commit, "git_dirty": dirty}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or ``platform``'s guess), e.g. 'AMD EPYC'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What produced a run: code version, library versions, backend, devices and CPU.

    Call after ``jax.distributed.initialize`` (it asks JAX for its devices). Example keys:
    ``{'code': {...}, 'python': '3.12.3', 'jax': '0.10.2', ..., 'backend': 'cpu',
    'devices': '8 x cpu', 'process_count': 1, 'cpu': 'AMD EPYC ...', 'platform': 'Linux-...'}``.
    """
    import jax  # here, so the module's file helpers need no JAX

    libs = {}
    for name, dist in (("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"),
                       ("optax", "optax"), ("orbax", "orbax-checkpoint"), ("numpy", "numpy")):
        try:
            libs[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            libs[name] = None
    devices = jax.devices()
    return {"code": code_version(), "python": platform.python_version(), **libs,
            "backend": jax.default_backend(),
            "devices": f"{len(devices)} x {devices[0].device_kind}",
            "process_count": jax.process_count(), "cpu": cpu_model(),
            "platform": platform.platform()}
