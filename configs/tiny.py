"""The paper architecture at small widths: CPU tests and the demo (64 px images, 16x16 latents).

    ehrxdiff train --config configs/tiny.py --data DIR --workdir DIR
"""
from configs import base


def get_config():
  c = base.get_config()
  c.name = "tiny"
  m = c.model
  m.vae.update(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, norm_groups=8)
  m.unet.update(model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, num_heads=4,
                context_dim=64, norm_groups=8)
  m.image_tower.update(image_size=64, patch_size=16, width=64, layers=2, heads=4, mlp_dim=256)
  m.table_tower.update(event_dim=64, heads=4, ff_dim=128, layers=2, out_dim=64)
  m.conditioner.update(max_events=32, context_tokens=32, context_dim=64)
  c.data.image_size = 64
  t = c.train
  t.batch_size = 8
  t.num_steps = 200
  t.learning_rate = 1e-3
  t.ema_decay = 0.999
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 2
  t.ckpt_every = 100
  c.sample.update(steps=20, batch_size=8)
  return c
