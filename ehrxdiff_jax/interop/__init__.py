"""PyTorch state dicts -> our parameter trees. Public converters (see README, "Weight import"):

  interop.vae.convert_diffusers_vae / convert_ldm_vae
  interop.unet.convert_diffusers_unet / convert_ldm_unet
  interop.clip.convert_hf_clip_vision / convert_torch_table_tower / convert_reference_conditioner

Each takes a flat state dict {name: tensor or array} with the names the peer library writes and
returns a nested dict of numpy arrays matching our Flax parameters. Runtime code never imports torch;
only `load_state_dict` does, lazily, to read .pt/.ckpt files with `weights_only=True`.
"""
