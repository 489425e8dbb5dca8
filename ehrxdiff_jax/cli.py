"""`ehrxdiff`: thin command-line front end. Each subcommand lives in the module named below, which
defines `add_arguments(parser)` and `run(args) -> int`; modules are imported only when their command runs.

A user error (`ehrxdiff_jax/errors.py`: bad input, bad config, refused output) is printed as one line
`error: ...` with exit status 2; `--debug` (or EHRXDIFF_DEBUG=1) shows its traceback instead."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ehrxdiff_jax import errors

COMMANDS = {
    "info": ("ehrxdiff_jax.commands.info", "parameter counts and forward FLOPs of every network of a config"),
    "demo-data": ("data_prep.synthetic", "write a small synthetic database in the MIMIC-IV / MIMIC-CXR-JPG formats"),
    "prepare": ("data_prep.prepare", "MIMIC-IV + MIMIC-CXR-JPG -> ArrayRecord shards of (I_prev, S_event, I_trg)"),
    "train": ("ehrxdiff_jax.commands.train", "train a model (LDM, CLIP, VAE or table classifier) from a config"),
    "sample": ("ehrxdiff_jax.commands.sample", "predict target X-rays with a trained or imported model"),
    "convert": ("ehrxdiff_jax.commands.convert", "convert published PyTorch checkpoints to an orbax checkpoint"),
    "evaluate": ("ehrxdiff_jax.commands.evaluate", "the paper's tables from generated images"),
    "bench": ("ehrxdiff_jax.commands.bench", "speed benchmarks: training step and sampling"),
    "demo": ("ehrxdiff_jax.commands.demo", "the whole pipeline end to end on the synthetic database"),
}


def _top_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="ehrxdiff",
      description="EHRXDiff-JAX: predict the next chest X-ray from the previous one and the EHR events in between.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="commands:\n" + "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
      + "\n\n'ehrxdiff COMMAND --help' shows a command's options.")
  parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  top = _top_parser()
  if not argv or argv[0] in ("-h", "--help"):
    top.print_help()
    return 0
  command = top.parse_args(argv[:1]).command
  module_name, help_ = COMMANDS[command]
  module = importlib.import_module(module_name)
  parser = argparse.ArgumentParser(prog=f"ehrxdiff {command}", description=help_)
  module.add_arguments(parser)
  parser.add_argument("--debug", action="store_true",
                      help=f"show the traceback of an input or config error (or set {errors.DEBUG_ENV}=1)")
  args, unknown = parser.parse_known_args(argv[1:])
  overrides = [u for u in unknown if u.startswith("--config.")]
  rest = [u for u in unknown if not u.startswith("--config.")]
  if rest:
    parser.error(f"unrecognised arguments: {' '.join(rest)}")
  args.config_overrides = overrides
  try:
    return int(module.run(args) or 0)
  except errors.USER_ERRORS as e:
    if args.debug or os.environ.get(errors.DEBUG_ENV, "") not in ("", "0"):
      raise
    print(f"error: {errors.message(e)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
