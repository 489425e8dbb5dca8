"""EHRXDiff as in the paper (no w_null samples).

    ehrxdiff train --config configs/ehrxdiff.py --data DIR --workdir DIR
"""
from configs import base


def get_config():
  return base.get_config()
