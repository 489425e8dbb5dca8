"""The launchers' dry runs: exact commands and environment for single GPU, SLURM sizes and TPU pods."""
import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

from ehrxdiff_jax.config_util import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("launch_py", os.path.join(ROOT, "launch", "launch.py"))
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)


def dry_run(*argv):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "launch.py"), *argv, "--dry-run"],
                       capture_output=True, text=True, check=True)
  return out.stdout


def test_local_dry_run_prints_env_and_exact_command():
  out = dry_run("local", "--config", "configs/a6000.py", "--data", "/d", "--workdir", "/w",
                "--config.train.num_steps=10")
  lines = out.strip().splitlines()
  assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95" in lines
  assert "export JAX_COMPILATION_CACHE_DIR=/w/jax_cache" in lines
  assert shlex.split(lines[-1]) == ["ehrxdiff", "train", "--config", "configs/a6000.py", "--data", "/d",
                                    "--workdir", "/w", "--config.train.num_steps=10"]


@pytest.mark.parametrize("nodes,gpus,per", [(1, 8, "node"), (4, 8, "gpu"), (16, 4, "node")])
def test_slurm_script_for_several_sizes(nodes, gpus, per):
  out = dry_run("slurm", "--config", "configs/h200.py", "--data", "/shared/data", "--workdir", "/shared/run",
                "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--process-per", per,
                "--partition", "gpu", "--nccl-socket-ifname", "ib0")
  assert out.startswith("#!/bin/bash\n")
  assert f"#SBATCH --nodes={nodes}\n" in out
  assert f"#SBATCH --ntasks-per-node={gpus if per == 'gpu' else 1}\n" in out
  assert f"#SBATCH --gpus-per-node={gpus}\n" in out
  assert "#SBATCH --partition=gpu\n" in out
  assert "#SBATCH --signal=TERM@120" in out
  assert "export NCCL_SOCKET_IFNAME=ib0\n" in out
  assert "export JAX_COMPILATION_CACHE_DIR=/shared/run/jax_cache\n" in out
  srun = [l for l in out.splitlines() if l.startswith("srun ")]
  assert len(srun) == 1
  assert "ehrxdiff train --config configs/h200.py --data /shared/data --workdir /shared/run" in srun[0]
  assert ("CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in srun[0]) == (per == "gpu")


def test_tpu_command_runs_on_every_worker_with_tpu_extra():
  out = dry_run("tpu", "--config", "configs/tpu_v5p.py", "--data", "gs://b/data", "--workdir", "gs://b/run",
                "--tpu", "my-v5p", "--zone", "us-east5-a", "--project", "proj")
  cmd = shlex.split(out)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p"]
  assert "--worker=all" in cmd and "--zone=us-east5-a" in cmd and "--project=proj" in cmd
  remote = [c for c in cmd if c.startswith("--command=")][0]
  assert "pip install -q -e '.[tpu]'" in remote
  assert "ehrxdiff train --config configs/tpu_v5p.py --data gs://b/data --workdir gs://b/run" in remote


def test_unknown_argument_is_refused():
  res = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "launch.py"), "local", "--config", "c",
                        "--data", "d", "--workdir", "w", "--bogus", "--dry-run"], capture_output=True, text=True)
  assert res.returncode != 0 and "--bogus" in res.stderr


@pytest.mark.parametrize("name,batch,accum,micro", [("a6000", 128, 8, 16), ("h200", 128, 1, 128)])
def test_hardware_configs_reach_the_paper_batch(name, batch, accum, micro):
  cfg = load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  assert cfg.train.batch_size == batch and cfg.train.grad_accum == accum
  assert cfg.train.batch_size // cfg.train.grad_accum == micro
  assert cfg.model.dtype == "bfloat16" and cfg.data.w_null


def test_tpu_configs_use_fsdp_over_all_chips():
  for variant, batch in (("v5p", 256), ("v4", 128)):
    cfg = load_config(os.path.join(ROOT, "configs", "tpu_v5p.py") + f":{variant}")
    assert cfg.mesh.shape.fsdp == -1 and cfg.train.batch_size == batch
