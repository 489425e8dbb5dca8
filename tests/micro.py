"""The micro LDM shared by the tests that compile whole training steps or samplers (sharding equivalence,
bench, cached latents, sample hook): the tiny config shrunk further, same code paths, quick compiles."""
from ehrxdiff_jax.config_util import apply_override

# 32 px images, 16x16 latents.
MICRO = [
    "data.image_size=32",
    "model.vae.ch=8", "model.vae.ch_mult=(1,2)", "model.vae.norm_groups=4",
    "model.unet.model_channels=16", "model.unet.channel_mult=(1,2)", "model.unet.attention_levels=(1,)",
    "model.unet.num_heads=2", "model.unet.context_dim=32", "model.unet.norm_groups=4",
    "model.image_tower.image_size=32", "model.image_tower.patch_size=16", "model.image_tower.width=32",
    "model.image_tower.layers=1", "model.image_tower.heads=2", "model.image_tower.mlp_dim=64",
    "model.table_tower.event_dim=16", "model.table_tower.heads=2", "model.table_tower.ff_dim=32",
    "model.table_tower.layers=1", "model.table_tower.out_dim=32",
    "model.conditioner.max_events=8", "model.conditioner.context_tokens=8", "model.conditioner.context_dim=32",
    "train.batch_size=8", "mesh.min_shard_size=0",
]


def micro_config(tiny_config, *overrides):
  cfg = tiny_config.copy_and_resolve_references()
  for o in MICRO + list(overrides):
    apply_override(cfg, o)
  return cfg
