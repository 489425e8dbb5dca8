#!/usr/bin/env python3
"""Launch EHRXDiff-JAX training on one GPU, on SLURM clusters (one or many nodes) or on TPU VM pods.

    python launch/launch.py local --config configs/a6000.py --data DIR --workdir DIR [--dry-run]
    python launch/launch.py slurm --config configs/h200.py --data DIR --workdir DIR --nodes 4 --gpus-per-node 8
    python launch/launch.py tpu   --config configs/tpu_v5p.py --data gs://B/data --workdir gs://B/run --tpu NAME --zone Z

Every launcher goes through JAX's own multi-controller runtime: one process per host (TPU, SLURM per
node) or per GPU (SLURM per GPU), `jax.distributed.initialize()` reading the SLURM or TPU environment.
`--dry-run` prints exactly what would run (the command, the environment, the sbatch script) and runs
nothing. Extra `--config.x=y` arguments are passed through to `ehrxdiff train`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ehrxdiff_jax.xla_flags import runtime_env  # noqa: E402


def train_command(config: str, data: str, workdir: str, overrides: list[str]) -> list[str]:
  return ["ehrxdiff", "train", "--config", config, "--data", data, "--workdir", workdir, *overrides]


def _env_lines(env: dict[str, str]) -> list[str]:
  return [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]


def render_local(args, overrides) -> tuple[dict[str, str], list[str]]:
  """Single GPU (or CPU): environment and command."""
  env = runtime_env(args.platform, XLA_PYTHON_CLIENT_MEM_FRACTION=str(args.mem_fraction)) \
      if args.platform == "gpu" else runtime_env(args.platform)
  env["JAX_COMPILATION_CACHE_DIR"] = args.cache_dir or os.path.join(args.workdir, "jax_cache")
  return env, train_command(args.config, args.data, args.workdir, overrides)


def render_slurm(args, overrides) -> str:
  """An sbatch script: srun starts one process per node or per GPU; jax.distributed reads SLURM's env."""
  per_gpu = args.process_per == "gpu"
  tasks_per_node = args.gpus_per_node if per_gpu else 1
  env = runtime_env("gpu", XLA_PYTHON_CLIENT_MEM_FRACTION=str(args.mem_fraction))
  env["JAX_COMPILATION_CACHE_DIR"] = args.cache_dir or os.path.join(args.workdir, "jax_cache")
  if args.nccl_socket_ifname:
    env["NCCL_SOCKET_IFNAME"] = args.nccl_socket_ifname
  cmd = " ".join(shlex.quote(c) for c in train_command(args.config, args.data, args.workdir, overrides))
  if per_gpu:  # each task sees its own GPU; JAX numbers processes from SLURM_PROCID
    cmd = f"bash -c {shlex.quote('CUDA_VISIBLE_DEVICES=$SLURM_LOCALID exec ' + cmd)}"
  header = [
      "#!/bin/bash",
      f"#SBATCH --job-name={args.job_name}",
      f"#SBATCH --nodes={args.nodes}",
      f"#SBATCH --ntasks-per-node={tasks_per_node}",
      f"#SBATCH --gpus-per-node={args.gpus_per_node}",
      f"#SBATCH --cpus-per-task={args.cpus_per_task}",
      f"#SBATCH --time={args.time}",
      f"#SBATCH --output={os.path.join(args.workdir, 'slurm-%j.out')}",
      "#SBATCH --signal=TERM@120  # SIGTERM two minutes before the limit: the trainer checkpoints and exits",
  ]
  if args.partition:
    header.append(f"#SBATCH --partition={args.partition}")
  if args.account:
    header.append(f"#SBATCH --account={args.account}")
  body = ["set -euo pipefail", *_env_lines(env),
          f"mkdir -p {shlex.quote(args.workdir)} {shlex.quote(env['JAX_COMPILATION_CACHE_DIR'])}",
          f"# {args.nodes} node(s) x {tasks_per_node} process(es); workdir and data on shared storage",
          f"srun --kill-on-bad-exit=1 {cmd}"]
  return "\n".join(header + [""] + body) + "\n"


def render_tpu(args, overrides) -> list[str]:
  """gcloud command that starts the same training on every worker of a TPU VM slice."""
  env = runtime_env("tpu")
  env["JAX_COMPILATION_CACHE_DIR"] = args.cache_dir or os.path.join(args.workdir, "jax_cache")
  train = " ".join(shlex.quote(c) for c in train_command(args.config, args.data, args.workdir, overrides))
  remote = " && ".join([
      f"cd {shlex.quote(args.repo_dir)}",
      "python3 -m pip install -q -e '.[tpu]'",
      *_env_lines(env),
      train,
  ])
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}", "--worker=all",
         f"--command={remote}"]
  if args.project:
    cmd.insert(6, f"--project={args.project}")
  return cmd


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="target", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--config", required=True)
  common.add_argument("--data", required=True)
  common.add_argument("--workdir", required=True)
  common.add_argument("--cache-dir", default="", help="shared persistent compile cache (default WORKDIR/jax_cache)")
  common.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
  local = sub.add_parser("local", parents=[common], help="one machine, one process (single GPU or CPU)")
  local.add_argument("--platform", choices=["gpu", "tpu", "cpu"], default="gpu")
  local.add_argument("--mem-fraction", type=float, default=0.95)
  slurm = sub.add_parser("slurm", parents=[common], help="SLURM: sbatch + srun, one or many nodes")
  slurm.add_argument("--nodes", type=int, default=1)
  slurm.add_argument("--gpus-per-node", type=int, default=8)
  slurm.add_argument("--process-per", choices=["node", "gpu"], default="node")
  slurm.add_argument("--cpus-per-task", type=int, default=16)
  slurm.add_argument("--time", default="48:00:00")
  slurm.add_argument("--partition", default="")
  slurm.add_argument("--account", default="")
  slurm.add_argument("--job-name", default="ehrxdiff")
  slurm.add_argument("--mem-fraction", type=float, default=0.95)
  slurm.add_argument("--nccl-socket-ifname", default="")
  tpu = sub.add_parser("tpu", parents=[common], help="TPU VM slice: the same command on --worker=all")
  tpu.add_argument("--tpu", required=True, help="TPU VM name")
  tpu.add_argument("--zone", required=True)
  tpu.add_argument("--project", default="")
  tpu.add_argument("--repo-dir", default="~/ehrxdiff-jax", help="checkout of this repo on every worker")
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  bad = [r for r in rest if not r.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments: {' '.join(bad)}")
  if args.target == "local":
    env, cmd = render_local(args, rest)
    if args.dry_run:
      print("\n".join(_env_lines(env) + [shlex.join(cmd)]))
      return 0
    return subprocess.call(cmd, env={**os.environ, **env})
  if args.target == "slurm":
    script = render_slurm(args, rest)
    if args.dry_run:
      print(script, end="")
      return 0
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, "launch.sbatch")
    with open(path, "w") as f:
      f.write(script)
    return subprocess.call(["sbatch", path])
  cmd = render_tpu(args, rest)
  if args.dry_run:
    print(shlex.join(cmd))
    return 0
  return subprocess.call(cmd)


if __name__ == "__main__":
  sys.exit(main())
