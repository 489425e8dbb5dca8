"""Atomic output directories (prepare, sample, convert)."""
import os

import pytest

from ehrxdiff_jax import outputs


def test_atomic_directory_refuses_replaces_and_cleans_up(tmp_path):
  out = tmp_path / "out"
  with outputs.atomic_directory(str(out)) as tmp:
    assert os.path.basename(tmp) == f"out.tmp-{os.getpid()}" and not out.exists()  # nothing final mid-way
    (tmp_path / tmp / "a.txt").write_text("first")
  assert (out / "a.txt").read_text() == "first"
  with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
    with outputs.atomic_directory(str(out)):
      pass
  # a failing block leaves the old output untouched and no temporary directory behind
  with pytest.raises(RuntimeError):
    with outputs.atomic_directory(str(out), overwrite=True) as tmp:
      (tmp_path / tmp / "b.txt").write_text("half")
      raise RuntimeError("interrupted")
  assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == ["a.txt"]
  with outputs.atomic_directory(str(out) + "/", overwrite=True) as tmp:
    (tmp_path / tmp / "b.txt").write_text("second")
  assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == ["b.txt"]


def test_check_writable(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "file").write_text("x")
  assert outputs.check_writable(str(tmp_path / "new"), False) == str(tmp_path / "new")
  assert outputs.check_writable(str(tmp_path / "empty"), False, allow_empty=True) == str(tmp_path / "empty")
  with pytest.raises(FileExistsError, match="exists; pass"):
    outputs.check_writable(str(tmp_path / "empty"), False)
  (tmp_path / "empty" / "x").write_text("x")
  with pytest.raises(FileExistsError, match="exists and is not empty"):
    outputs.check_writable(str(tmp_path / "empty"), False, allow_empty=True)
  with pytest.raises(FileExistsError, match="is a file"):
    outputs.check_writable(str(tmp_path / "file"), True)


def test_shared_temporary_directory_only_the_owner_commits(tmp_path):
  """Multi-host: every process writes into one agreed temporary directory; only the owner creates it and
  renames it (the callers order them with barriers; here sequentially)."""
  out = str(tmp_path / "out")
  tmp = outputs.temporary_path(out, pid=4242)
  assert tmp == out + ".tmp-4242"
  with outputs.atomic_directory(out, tmp=tmp, owner=True) as owner_tmp:
    assert owner_tmp == tmp and os.path.isdir(tmp)
    with outputs.atomic_directory(out, tmp=tmp, owner=False) as other_tmp:   # another process's block
      (tmp_path / other_tmp / "rows_1.txt").write_text("process 1")
    assert os.path.isdir(tmp) and not os.path.exists(out)   # the non-owner neither renamed nor removed it
    (tmp_path / owner_tmp / "rows_0.txt").write_text("process 0")
  assert sorted(os.listdir(out)) == ["rows_0.txt", "rows_1.txt"] and not os.path.exists(tmp)


def test_leftovers_of_dead_processes_are_named_and_removed(tmp_path, caplog):
  """A SIGKILLed run leaves OUT.tmp-<pid>; the next run writing OUT removes it (not a live process's)."""
  import subprocess
  import sys
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    out = str(tmp_path / "out")
    for pid in (dead.pid, live.pid):
      os.makedirs(outputs.temporary_path(out, pid))
      (tmp_path / f"out.tmp-{pid}" / "half.txt").write_text("half")
    with caplog.at_level("WARNING"):
      with outputs.atomic_directory(out) as tmp:
        (tmp_path / tmp / "a.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["out", f"out.tmp-{live.pid}"]
    assert (f"removing {outputs.temporary_path(out, dead.pid)}: the unfinished output of an interrupted run "
            f"(process {dead.pid} no longer runs)") in caplog.text
  finally:
    live.kill()
    live.wait()
