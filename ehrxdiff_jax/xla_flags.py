"""The XLA flags and runtime environment we set per platform: the one place, each with its reason.

Policy: a flag is set by default only with a measured reason recorded here and in BENCHMARKS.md.
Candidates that are believed to help but are not yet measured on our model stay in `CANDIDATES`;
`bench/gpu.sh` measures the training and sampling benchmarks with and without them, so that the next
GPU session can promote (or drop) each one with a figure.
"""
from __future__ import annotations

# platform -> {flag: reason}. Empty until a measurement justifies a flag (see module docstring).
DEFAULT_XLA_FLAGS: dict[str, dict[str, str]] = {
    "gpu": {},
    "tpu": {},
    "cpu": {},
}

# Not set by default; measured by bench/gpu.sh (GPU) side by side with the defaults.
CANDIDATES: dict[str, dict[str, str]] = {
    "gpu": {
        "--xla_gpu_enable_latency_hiding_scheduler=true":
            "overlaps FSDP all-gathers / reduce-scatters with compute on multi-GPU meshes",
        "--xla_gpu_enable_command_buffer=": "CUDA graphs off; sometimes faster for many small kernels",
    },
    "tpu": {
        "--xla_tpu_enable_latency_hiding_scheduler=true": "overlaps FSDP collectives with compute",
    },
}

# Environment that is not an XLA flag, with its reason (set by the launchers).
RUNTIME_ENV: dict[str, dict[str, tuple[str, str]]] = {
    "gpu": {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": ("0.95", "JAX preallocates 75% by default; the paper config at "
                                           "batch 16 per micro-step on a 48 GB A6000 needs more"),
        "NCCL_DEBUG": ("WARN", "NCCL errors and warnings in the job log, no per-call noise"),
    },
    "tpu": {},
    "cpu": {},
}


def xla_flags(platform: str, extra: tuple[str, ...] = ()) -> str:
  """The XLA_FLAGS string for a platform ('gpu' | 'tpu' | 'cpu') plus any extra flags."""
  if platform not in DEFAULT_XLA_FLAGS:
    raise ValueError(f"unknown platform {platform!r}; expected one of {sorted(DEFAULT_XLA_FLAGS)}")
  return " ".join([*DEFAULT_XLA_FLAGS[platform], *extra])


def runtime_env(platform: str, xla_extra: tuple[str, ...] = (), **overrides: str) -> dict[str, str]:
  """Environment variables for a launcher: runtime settings plus XLA_FLAGS (omitted when empty)."""
  env = {k: v for k, (v, _) in RUNTIME_ENV[platform].items()}
  env.update(overrides)
  flags = xla_flags(platform, xla_extra)
  if flags:
    env["XLA_FLAGS"] = flags
  return env
