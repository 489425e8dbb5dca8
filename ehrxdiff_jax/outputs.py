"""Output directories written atomically (prepare, sample, convert).

Everything goes under the sibling `OUT.tmp-<pid>` (same filesystem, so the final rename is atomic) and is
renamed to OUT only when the block succeeds: an interrupted or failed run never leaves a half output that
looks finished. An existing OUT is refused unless the caller asked to overwrite; it is replaced only after
the new output is complete.

Several processes of one multi-host run write one output through the same temporary directory
(`temporary_path(out, pid)` with a pid they agreed on); only one of them, the owner, creates and renames it.

A killed run (SIGKILL, power loss) leaves its `OUT.tmp-<pid>` behind; the next run that writes OUT names
and removes those whose process no longer runs on this machine (the owner, which creates temporary
directories, is the one that checks).
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
from typing import Iterator

log = logging.getLogger(__name__)


def check_writable(out: str, overwrite: bool, allow_empty: bool = False) -> str:
  """The absolute path of `out`; FileExistsError if it is a file, or an existing directory (non-empty
  when `allow_empty`) without `overwrite`."""
  out = os.path.abspath(out.rstrip("/"))
  if os.path.isfile(out):
    raise FileExistsError(f"output {out} is a file")
  if os.path.isdir(out) and not overwrite and not (allow_empty and not os.listdir(out)):
    state = "exists and is not empty" if allow_empty else "exists"
    raise FileExistsError(f"output directory {out} {state}; pass --overwrite to replace it")
  return out


def temporary_path(out: str, pid: int | None = None) -> str:
  """The temporary sibling `OUT.tmp-<pid>` of an output directory (default: this process's pid)."""
  return f"{os.path.abspath(out.rstrip('/'))}.tmp-{os.getpid() if pid is None else int(pid)}"


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def remove_stale_temporaries(out: str) -> list[str]:
  """Removes the `OUT.tmp-<pid>` left by processes that no longer run; returns their paths."""
  removed = []
  for path in sorted(glob.glob(glob.escape(os.path.abspath(out.rstrip("/")) + ".tmp-") + "*")):
    pid = path.rsplit(".tmp-", 1)[1]
    if pid.isdigit() and not _running(int(pid)) and os.path.isdir(path):
      log.warning("removing %s: the unfinished output of an interrupted run (process %s no longer runs)", path, pid)
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


@contextlib.contextmanager
def atomic_directory(out: str, overwrite: bool = False, allow_empty: bool = False, tmp: str | None = None,
                     owner: bool = True) -> Iterator[str]:
  """Yields a fresh temporary directory next to `out`, renamed to `out` when the block succeeds and
  removed when it raises (see check_writable for the refusals).

  Multi-host: every process passes the same `tmp` (temporary_path with an agreed pid) and exactly one
  passes owner=True; only the owner creates and renames the directory, the others write into it (any
  process removes it when its block raises). The caller orders them with barriers: the others write only
  after the owner entered the block, and the owner leaves it only after every process's last write."""
  out = check_writable(out, overwrite, allow_empty)
  tmp = temporary_path(out) if tmp is None else tmp
  if owner:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    remove_stale_temporaries(out)
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
    os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if not owner:
    return
  old = None
  if os.path.exists(out):
    old = f"{out}.old-{os.getpid()}"
    os.rename(out, old)
  os.rename(tmp, out)
  if old:
    shutil.rmtree(old, ignore_errors=True)
