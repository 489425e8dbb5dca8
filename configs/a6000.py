"""EHRXDiff_w_null on one 48 GB RTX A6000 (Ampere): the paper's global batch 128 as 8 micro-batches of
16 with gradient accumulation, bf16 compute, rematerialisation of every block.

    python launch/launch.py local --config configs/a6000.py --data DIR --workdir DIR
"""
from configs import ehrxdiff_wnull


def get_config():
  c = ehrxdiff_wnull.get_config()
  c.name = "ehrxdiff_wnull_a6000"
  c.model.dtype = "bfloat16"
  c.model.remat = "block"
  c.train.batch_size = 128
  c.train.grad_accum = 8
  c.sample.batch_size = 32
  return c
