"""The base config: the paper's EHRXDiff (no w_null), every field that the shared machinery reads.

Options of one trainer only are declared in its config (train.clip_* in clip.py, train.vae_* in vae.py,
model.imagenome_classifier in image_classifier.py).

Named variants (`ehrxdiff.py`, `ehrxdiff_wnull.py`, `tiny.py`, hardware files) import `get_config` from
here and change a few fields. Every field can be overridden on the command line:
    ehrxdiff train --config configs/ehrxdiff.py --config.train.batch_size=256
"""
import ml_collections

# Logical axis rules: logical names used by the networks -> mesh axes. Model code only knows the
# logical names (see ehrxdiff_jax/nn/layers.py); these tables are the only place that knows the mesh.
FSDP_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_in", None),
    ("tokens", None),
    ("norm", None),
)
TENSOR_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", None),
    ("conv_out", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_in", None),
    ("tokens", None),
    ("norm", None),
)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "ehrxdiff"
  c.seed = 0

  # ---------------------------------------------------------------- model
  m = c.model = ml_collections.ConfigDict()
  m.dtype = "float32"            # compute dtype: float32 | bfloat16 (parameters are always float32)
  m.attention = "auto"           # auto | xla | cudnn  (auto: cuDNN fused kernel on NVIDIA GPUs in bf16)
  m.remat = "none"               # none | block  (jax.checkpoint around every res/transformer block)

  m.vae = ml_collections.ConfigDict(dict(
      in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2,
      z_channels=3, embed_dim=3, norm_groups=32, norm_eps=1e-6,
  ))
  m.unet = ml_collections.ConfigDict(dict(
      in_channels=3, out_channels=3, model_channels=224, channel_mult=(1, 2, 4, 4),
      num_res_blocks=2, attention_levels=(1, 2, 3),  # downsample factors 2, 4, 8
      num_heads=8, transformer_depth=1, context_dim=768, norm_groups=32,
      adm_in_channels=0,  # > 0: a vector added to the time embedding (conditioner.pooled_events)
  ))
  m.image_tower = ml_collections.ConfigDict(dict(
      image_size=256, patch_size=32, width=768, layers=12, heads=12, mlp_dim=3072,
  ))
  m.table_tower = ml_collections.ConfigDict(dict(
      event_dim=1536, heads=24, ff_dim=6144, layers=2, dropout=0.1, out_dim=768,
      # torch's TransformerEncoderLayer also drops attention probabilities at `dropout`; a separate knob
      # because that site forces the non-fused attention path (nn/table.py): 0 keeps cuDNN attention.
      attention_dropout=0.1,
      input_scale=1.0,  # events are multiplied by this first (unit-norm embeddings are tiny per entry)
  ))
  m.conditioner = ml_collections.ConfigDict(dict(
      # Which condition streams enter the cross-attention context (paper Table 4 ablation rows):
      # 'table' (CLIP table tower tokens), 'image' (CLIP image tower tokens), 'vae' (VAE tokens of I_prev).
      cross_attention=("table", "image", "vae"),
      # VAE latent of I_prev concatenated to the UNet input (then unet.in_channels must be 6).
      vae_concat=False,
      max_events=1024,
      context_tokens=1024,
      context_dim=768,
      # Table-tower output at padded event slots in deterministic (sampling / validation) calls: 'zero' as
      # the reference's sampler (torch's eval-mode TransformerEncoder under no_grad zeroes them before fc;
      # the published checkpoints' outputs), 'train' as in training. Training itself never changes.
      padded_slots_at_inference="zero",
      # Not in the reference: the masked mean of the table tokens as one extra context token that the
      # UNet adds to its time embedding (needs unet.adm_in_channels = context_dim; nn/conditioner.py).
      pooled_events=False,
  ))

  # ---------------------------------------------------------------- diffusion
  c.diffusion = ml_collections.ConfigDict(dict(
      num_timesteps=1000, beta_schedule="linear", linear_start=0.0015, linear_end=0.0295,
      scale_factor=0.18215,
      # Departures from the paper, each off by default (ehrxdiff_jax/diffusion.py):
      prediction="epsilon",             # epsilon | v
      rescale_zero_terminal_snr=False,  # alpha_bar[T-1] = 0 (needs prediction='v')
      loss_weighting="uniform",         # uniform | min_snr
      min_snr_gamma=5.0,
      loss_buckets=10,                  # log loss_t{k} for K equal t buckets (0: none); no effect on training
  ))

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict(dict(
      dir="",                    # the output of `ehrxdiff prepare`
      image_size=256,
      w_null=False,              # EHRXDiff_w_null: no-change samples + random affine on every target
      augment_target=False,      # RandomAffine(rot +-10, scale 0.9-1.1, nearest, fill 0) on targets
      cached_latents=False,      # use VAE latents stored in the records instead of encoding images
      shuffle_seed=0,
      num_workers=0,             # grain worker processes; 0 = in-process (fastest on 2 cores)
      read_threads=0,            # grain read threads per process; 0 = 1
      prefetch=2,                # grain prefetch buffer (batches)
      labels=None,               # label set of the batch: imagenome | chexpert | '' (none); None = imagenome if present
      train_split="train",
      valid_split="valid",
  ))

  # ---------------------------------------------------------------- training
  t = c.train = ml_collections.ConfigDict()
  t.objective = "ldm"            # ldm | clip | vae | table_classifier | image_classifier
  t.batch_size = 128             # global batch per optimisation step
  t.grad_accum = 1               # micro-batches per step (micro batch = batch_size / grad_accum)
  t.num_steps = 100_000
  t.learning_rate = 5e-5
  t.schedule = "constant"        # constant | cosine | cosine_restarts (train/state.py learning_rate_schedule)
  t.warmup_steps = 0
  t.restart_every = 0            # cosine_restarts: cycle length in steps (warm-up + cosine, then restart)
  t.weight_decay = 0.01
  t.b1 = 0.9
  t.b2 = 0.999
  t.eps = 1e-8
  t.grad_clip = 0.0              # 0 = no clipping (reference)
  t.ema_decay = 0.9999
  t.cond_dropout = 0.0           # probability of dropping the conditions (classifier-free guidance); 0 = reference
  t.event_dropout = 0.0          # probability of removing every event of a sample (guidance_null='no_events'); 0 = reference
  t.log_every = 50
  t.eval_every = 2000
  t.eval_batches = 8
  t.sample_every = 0             # 0 = never during training
  t.ckpt_every = 2000
  t.keep_checkpoints = 3
  t.init_from = ""               # a run to initialise from: CLIP run (conditioner towers), VAE run, LDM run
  t.vae_from = ""                # LDM: the frozen VAE from a VAE run or a Cheff / LDM autoencoder file

  # ---------------------------------------------------------------- sampling
  c.sample = ml_collections.ConfigDict(dict(
      sampler="ddim", steps=100, eta=1.0, guidance_scale=1.0, batch_size=16, use_ema=True,
      timestep_spacing="leading",  # leading (LDM) | trailing (starts at t = T-1; ddim and ddpm)
      guidance_null="zeros",       # the unconditional branch: zeros (cond_dropout) | no_events (event_dropout)
  ))

  # ---------------------------------------------------------------- mesh
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.mesh.rules = FSDP_RULES
  c.mesh.min_shard_size = 2 ** 14  # parameters smaller than this stay replicated
  return c
