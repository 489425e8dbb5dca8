"""Configs as code: loading, named variants, command-line overrides and their errors."""
import os

import pytest

from ehrxdiff_jax.config_util import apply_override, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(name, overrides=()):
  return load_config(os.path.join(ROOT, "configs", f"{name}.py"), overrides)


def test_overrides_parse_to_the_field_type():
  c = cfg("ehrxdiff", ["--config.train.batch_size=256", "--config.train.learning_rate=1", "--config.model.dtype=bfloat16",
                       "--config.data.w_null=true", "--config.model.unet.channel_mult=[1,2]"])
  assert c.train.batch_size == 256 and isinstance(c.train.batch_size, int)
  assert c.train.learning_rate == 1.0 and isinstance(c.train.learning_rate, float)
  assert c.model.dtype == "bfloat16" and c.data.w_null is True
  assert c.model.unet.channel_mult == (1, 2)


@pytest.mark.parametrize("item,error", [("config.train.nope=1", KeyError), ("config.nope.x=1", KeyError),
                                        ("config.train.batch_size=abc", ValueError),
                                        ("config.data.w_null=maybe", ValueError),
                                        ("config.train.batch_size", ValueError)])
def test_bad_overrides_are_clear_errors(item, error):
  with pytest.raises(error):
    apply_override(cfg("tiny"), item)


def test_variants_differ_from_base_only_where_named():
  base, wnull = cfg("ehrxdiff"), cfg("ehrxdiff_wnull")
  assert not base.data.w_null and wnull.data.w_null and wnull.data.augment_target
  assert base.model.to_dict() == wnull.model.to_dict()
  tiny = cfg("tiny")
  assert tiny.model.unet.attention_levels == base.model.unet.attention_levels  # same architecture


def test_missing_config_file():
  with pytest.raises(FileNotFoundError):
    load_config("configs/does_not_exist.py")
