"""PyTorch state dicts <-> our parameter trees (see README, "Weight import from PyTorch").

Per network (a flat state dict with the peer library's names <-> our unboxed parameter tree; each
exporter beside its importer, walking the same name table):
  interop.vae    convert_diffusers_vae, convert_ldm_vae       diffusers AutoencoderKL; LDM / Cheff
                 export_ldm_vae
  interop.unet   convert_diffusers_unet, convert_ldm_unet,    diffusers UNet2DConditionModel; LDM
                 convert_ldm_unet_ema, export_ldm_unet        openaimodel; LitEma copies
  interop.clip   convert_hf_clip_vision, convert_openai_clip_visual, convert_torch_table_tower,
                 convert_reference_conditioner, convert_reference_clip, adapt_position_embedding,
                 export_openai_visual, export_table_tower, export_reference_conditioner
  interop.densenet  convert_xrv_densenet, load_xrv_densenet   torchxrayvision DenseNet-121
Whole checkpoints (every key accounted for, config checked against the weights):
  interop.ehrxdiff  import_ehrxdiff, import_cheff_vae, import_clip, load_torch_weights,
                    export_ehrxdiff_state_dict (to the reference's names)

Runtime code never imports torch; only `common.load_state_dict` does, lazily, to read .pt/.ckpt
files with `weights_only=True` (pickle is never executed). Shape errors name the torch key.
"""
