"""What the exporters ask of the operating system: write a file or swap a folder in without a reader ever seeing it
half-written, replace a graph file and its weights, and keep a child process from outliving the export that started
it. Standard library only, but for onnx where a graph is saved."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A name beside `path` to write to; renamed over `path` when the block ends, so a crash mid-write leaves the
    previous file intact (same folder: the rename is atomic)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def replace_dir(new: Path, out: Path) -> None:
    """Swap the finished folder `new` in at `out` with two renames, so no reader ever sees half of it. The previous
    folder waits as .NAME.old-PID-TIME beside `out` (the PID says whether its process still runs: see
    bundle.stale_leftovers) and is put back if the second rename fails."""
    new, out = Path(new), Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{int(time.time())}")
        out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        if old:
            old.rename(out)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def die_with_parent() -> None:
    """preexec_fn for the builder and ModelOpt subprocesses: on Linux they get SIGKILL when the export dies, so a
    killed export leaves no orphan writing into its temporary folder (which the next export removes)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def save_graph(model, path: Path) -> None:
    """Replace the graph file `path` and its external weights (path.name + ".data") with onnx ModelProto `model`'s."""
    import onnx

    path = Path(path)
    for f in path.parent.glob(path.name + "*"):
        f.unlink()
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
