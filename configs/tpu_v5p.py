"""EHRXDiff_w_null on a TPU v5p slice (e.g. v5p-32: 16 chips, 4 hosts): FSDP over all chips, bf16 compute,
global batch 256 (16 per chip); use `configs/tpu_v5p.py:v4` for TPU v4 pods (same mesh, batch 128).

    python launch/launch.py tpu --config configs/tpu_v5p.py --tpu NAME --zone ZONE --data gs://... --workdir gs://...
"""
from configs import base, ehrxdiff_wnull


def get_config(variant: str = "v5p"):
  c = ehrxdiff_wnull.get_config()
  c.name = f"ehrxdiff_wnull_tpu_{variant}"
  c.model.dtype = "bfloat16"
  c.model.attention = "xla"
  c.train.batch_size = 256 if variant == "v5p" else 128
  c.train.grad_accum = 1
  c.mesh.shape.update(data=1, fsdp=-1, tensor=1)
  c.mesh.rules = base.FSDP_RULES
  return c
