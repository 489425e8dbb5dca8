"""EHRXDiff_w_null on one NVIDIA H100/H200 (80-141 GB): bf16 compute, fused cuDNN attention, global batch
128 in one micro-batch, no rematerialisation.

    python launch/launch.py local --config configs/h200.py --data DIR --workdir DIR
"""
from configs import ehrxdiff_wnull


def get_config():
  c = ehrxdiff_wnull.get_config()
  c.name = "ehrxdiff_wnull_h200"
  c.model.dtype = "bfloat16"
  c.model.attention = "auto"
  c.train.batch_size = 128
  c.train.grad_accum = 1
  c.sample.batch_size = 64
  c.mesh.shape.update(data=-1, fsdp=1, tensor=1)
  return c
