"""EHRXDiff_w_null: adds a no-change sample per distinct target and a random affine on every target.

    ehrxdiff train --config configs/ehrxdiff_wnull.py --data DIR --workdir DIR
"""
from configs import base


def get_config():
  c = base.get_config()
  c.name = "ehrxdiff_wnull"
  c.data.w_null = True
  c.data.augment_target = True
  return c
