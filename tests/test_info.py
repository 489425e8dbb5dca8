"""`ehrxdiff info` and `ehrxdiff --help`: exact paper parameter counts without allocating weights."""
import functools
import json
import os

import jax

from ehrxdiff_jax import cli, models
from ehrxdiff_jax.config_util import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paper_parameter_counts_from_eval_shape():
  cfg = load_config(os.path.join(ROOT, "configs", "ehrxdiff.py"))
  shapes = jax.eval_shape(functools.partial(models.init_ldm, cfg), jax.random.key(0))
  counts = {name: models.param_count(tree) for name, tree in shapes.items()}
  assert counts == {"unet": 505_780_355, "conditioner": 149_575_168, "vae": 55_312_063}


def test_info_json_on_tiny_config(capsys):
  assert cli.main(["info", "--config", os.path.join(ROOT, "configs", "tiny.py"), "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["config"] == "tiny"
  assert set(info["params"]) == {"unet", "conditioner", "vae"} and all(v > 0 for v in info["params"].values())
  g = info["gflops_per_image"]
  assert set(g) == {"unet", "conditioner_with_vae_encode", "vae_encoder", "vae_decoder"}
  assert all(v > 0 for v in g.values())
  # The conditioner's figure includes the VAE encode of I_prev.
  assert g["conditioner_with_vae_encode"] > g["vae_encoder"]


def test_info_override_changes_the_count(capsys):
  path = os.path.join(ROOT, "configs", "tiny.py")
  cli.main(["info", "--config", path, "--json"])
  base = json.loads(capsys.readouterr().out)["params"]["unet"]
  cli.main(["info", "--config", path, "--json", "--config.model.unet.model_channels=64"])
  wider = json.loads(capsys.readouterr().out)["params"]["unet"]
  assert wider > base


def test_help_lists_every_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for name in cli.COMMANDS:
    assert name in out
