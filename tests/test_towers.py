"""CLIP image tower, CLIP table tower, conditioner and their weight converters (CPU, tiny shapes)."""
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ehrxdiff_jax.interop import clip as clip_interop
from ehrxdiff_jax.interop.common import ConversionError
from ehrxdiff_jax.nn.attention import dot_product_attention
from ehrxdiff_jax.nn.conditioner import STREAMS, Conditioner
from ehrxdiff_jax.nn.table import TableTower, pool_tokens
from ehrxdiff_jax.nn.vit import VisionTransformer
from tests.parity import max_rel_err, nhwc_to_nchw

torch = pytest.importorskip("torch")

PAPER_CONDITIONER_PARAMS = 149_575_168

# Small peers for the parity tests.
VIT = dict(image_size=128, patch_size=32, width=64, layers=2, heads=4, mlp_dim=256)
TAB = dict(event_dim=64, heads=4, ff_dim=128, layers=2, out_dim=32)


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(tree))))


def _shapes(tree):
  return jax.tree_util.tree_map(lambda x: tuple(x.shape), nn.unbox(tree))


def _build_conditioner(cfg, cross_attention=None):
  m = cfg.model
  factor = 2 ** (len(m.vae.ch_mult) - 1)
  return Conditioner(
      image_tower=VisionTransformer(**m.image_tower.to_dict()),
      table_tower=TableTower(**m.table_tower.to_dict()),
      cross_attention=tuple(m.conditioner.cross_attention if cross_attention is None else cross_attention),
      max_events=m.conditioner.max_events, context_tokens=m.conditioner.context_tokens,
      context_dim=m.conditioner.context_dim, latent_channels=m.vae.embed_dim,
      latent_size=cfg.data.image_size // factor)


def _inputs(cfg, b=2, abstract=False):
  m = cfg.model
  s, e, d = cfg.data.image_size, m.conditioner.max_events, m.table_tower.event_dim
  h = s // 2 ** (len(m.vae.ch_mult) - 1)
  shapes = [((b, s, s, 3), jnp.float32), ((b, h, h, m.vae.embed_dim), jnp.float32), ((b, e, d), jnp.float32),
            ((b, e), jnp.bool_)]
  if abstract:
    return [jax.ShapeDtypeStruct(sh, dt) for sh, dt in shapes]
  rng = np.random.default_rng(0)
  mask = np.arange(e)[None, :] < np.array([e // 2, 3])[:b, None]
  events = rng.normal(size=shapes[2][0]).astype(np.float32) * mask[..., None]
  return [jnp.asarray(rng.uniform(-1, 1, shapes[0][0]), jnp.float32),
          jnp.asarray(rng.normal(size=shapes[1][0]), jnp.float32), jnp.asarray(events), jnp.asarray(mask)]


# ----------------------------------------------------------------------------- conditioner

def test_conditioner_param_count_paper_config():
  from configs import base
  cfg = base.get_config()
  cond = _build_conditioner(cfg)
  variables = jax.eval_shape(cond.init, jax.random.key(0), *_inputs(cfg, b=1, abstract=True))
  params = variables["params"]
  assert set(params) == {"image_tower", "table_tower", "vae_proj", "adapter"}
  assert "ln_post" not in params["image_tower"]
  assert _count(params) == PAPER_CONDITIONER_PARAMS
  shapes = _shapes(params)
  assert shapes["adapter"]["kernel"] == (1024 + 65 + 3, 1024)
  assert shapes["vae_proj"]["kernel"] == (64 * 64, 768)
  assert shapes["image_tower"]["positional_embedding"] == (65, 768)
  assert shapes["table_tower"]["fc"]["kernel"] == (1536, 768)
  # Every parameter carries logical axis names (one per dimension).
  for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(leaf, nn.LogicallyPartitioned) and len(leaf.names) == leaf.value.ndim


@pytest.mark.parametrize("streams", [c for r in range(4) for c in itertools.combinations(STREAMS, r)],
                         ids=lambda c: "+".join(c) or "none")
def test_conditioner_ablation_shapes(tiny_config, streams):
  cfg = tiny_config
  cond = _build_conditioner(cfg, streams)
  args = _inputs(cfg, abstract=True)
  variables = jax.eval_shape(cond.init, jax.random.key(0), *args)
  out = jax.eval_shape(lambda v, a: cond.apply(v, *a), variables, args)
  k = cfg.model.conditioner
  if not streams:
    assert out is None and not variables.get("params")
    return
  params = variables["params"]
  expected = {"table": "table_tower", "image": "image_tower", "vae": "vae_proj"}
  assert set(params) == {expected[s] for s in streams} | ({"adapter"} if len(streams) > 1 else set())
  n_tokens = {"table": k.max_events, "image": 17, "vae": cfg.model.vae.embed_dim}
  tokens = k.context_tokens if len(streams) > 1 else n_tokens[streams[0]]
  assert out.shape == (2, tokens, k.context_dim) == (2,) + cond.context_shape()
  if len(streams) > 1:
    assert _shapes(params)["adapter"]["kernel"] == (sum(n_tokens[s] for s in streams), k.context_tokens)


def test_conditioner_forward_tiny(tiny_config):
  cfg = tiny_config
  cond = _build_conditioner(cfg)
  args = _inputs(cfg)
  variables = jax.jit(cond.init)(jax.random.key(0), *args)

  @jax.jit
  def run(v, args, rng):
    eval_out = cond.apply(v, *args)
    train_out = cond.apply(v, *args, deterministic=False, rngs={"dropout": rng})
    return eval_out, train_out

  out, out_train = run(variables, args, jax.random.key(1))
  assert out.shape == (2, 32, 64) and np.isfinite(np.asarray(out)).all()
  assert np.isfinite(np.asarray(out_train)).all()
  assert not np.allclose(out, out_train)  # dropout in the table tower is active in training
  # VAE tokens are channel-major (token i = channel i flattened row-major, the reference's NCHW flatten).
  vae_only = _build_conditioner(cfg, ("vae",))
  p = jax.tree_util.tree_map(np.asarray, nn.unbox(variables["params"]["vae_proj"]))
  got = vae_only.apply({"params": {"vae_proj": p}}, None, args[1], None, None)
  tok = np.transpose(np.asarray(args[1]), (0, 3, 1, 2)).reshape(2, 3, -1)
  np.testing.assert_allclose(got, tok @ p["kernel"] + p["bias"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- image tower

def _randomize(module, seed=0, std=0.2):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("weight") and p.ndim == 1:  # LayerNorm scales around 1
        p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
      else:
        p.copy_(std * torch.randn(p.shape, generator=g) / max(1.0, p.shape[-1] ** 0.5 / 4))
  return module


@pytest.fixture(scope="module")
def hf_vision():
  from transformers import CLIPVisionConfig, CLIPVisionModel
  config = CLIPVisionConfig(image_size=VIT["image_size"], patch_size=VIT["patch_size"], hidden_size=VIT["width"],
                            num_hidden_layers=VIT["layers"], num_attention_heads=VIT["heads"],
                            intermediate_size=VIT["mlp_dim"], hidden_act="quick_gelu", layer_norm_eps=1e-5)
  model = _randomize(CLIPVisionModel(config)).eval()
  return model, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_vit_parity_transformers(hf_vision):
  model, sd = hf_vision
  params = clip_interop.convert_hf_clip_vision(sd)
  vit = VisionTransformer(**VIT)
  images = np.random.default_rng(1).uniform(-1, 1, (2, VIT["image_size"], VIT["image_size"], 3)).astype(np.float32)
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(nhwc_to_nchw(images).copy()), output_hidden_states=True)
  tokens, pooled = jax.jit(lambda p, x: (vit.apply({"params": p}, x),
                                         vit.apply({"params": p}, x, method=VisionTransformer.pooled)))(params, images)
  err_tokens = max_rel_err(tokens, out.hidden_states[-1].numpy())
  err_pooled = max_rel_err(pooled, out.pooler_output.numpy())
  print(f"ViT parity vs transformers: tokens {err_tokens:.2e}, pooled {err_pooled:.2e}")
  assert tokens.shape == (2, 17, VIT["width"])
  assert err_tokens <= 1e-4 and err_pooled <= 1e-4


def _to_openai(sd_hf: dict, prefix: str = "") -> dict:
  """The transformers CLIP vision names -> OpenAI CLIP `visual.*` names (q/k/v fused into in_proj)."""
  out = {prefix + "conv1.weight": sd_hf["embeddings.patch_embedding.weight"],
         prefix + "class_embedding": sd_hf["embeddings.class_embedding"],
         prefix + "positional_embedding": sd_hf["embeddings.position_embedding.weight"],
         prefix + "proj": np.zeros((VIT["width"], 8), np.float32)}
  for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    for t in ("weight", "bias"):
      out[f"{prefix}{ours}.{t}"] = sd_hf[f"{theirs}.{t}"]
  for i in range(VIT["layers"]):
    h, o = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
    out[o + "attn.in_proj_weight"] = np.concatenate([sd_hf[f"{h}self_attn.{n}_proj.weight"] for n in "qkv"])
    out[o + "attn.in_proj_bias"] = np.concatenate([sd_hf[f"{h}self_attn.{n}_proj.bias"] for n in "qkv"])
    for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
      for t in ("weight", "bias"):
        out[f"{o}{ours}.{t}"] = sd_hf[f"{h}{theirs}.{t}"]
  return out


def _assert_trees_equal(a, b):
  assert _shapes(a) == _shapes(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_openai_converter_matches_hf(hf_vision):
  _, sd = hf_vision
  from_hf = clip_interop.convert_hf_clip_vision({"vision_model." + k: v for k, v in sd.items()})
  from_openai = clip_interop.convert_openai_clip_visual(_to_openai(sd, "visual."))
  _assert_trees_equal(from_hf, from_openai)
  no_post = clip_interop.convert_openai_clip_visual(_to_openai(sd, "visual."), include_ln_post=False)
  assert "ln_post" not in no_post
  # Adapting the 4x4+1 embedding to a 5x5 grid (a 160 px image) gives a working tower.
  adapted = clip_interop.convert_openai_clip_visual(_to_openai(sd, "visual."), grid=5)
  assert adapted["positional_embedding"].shape == (26, VIT["width"])
  out = jax.eval_shape(VisionTransformer(**{**VIT, "image_size": 160}).apply, {"params": adapted},
                       jax.ShapeDtypeStruct((1, 160, 160, 3), jnp.float32))
  assert out.shape == (1, 26, VIT["width"])


def test_adapt_position_embedding():
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(50, 16)).astype(np.float32)
  new = clip_interop.adapt_position_embedding(pos, 8)
  assert new.shape == (65, 16)
  np.testing.assert_array_equal(new[0], pos[0])
  np.testing.assert_array_equal(clip_interop.adapt_position_embedding(pos, 7), pos)
  const = np.concatenate([pos[:1], np.ones((49, 16), np.float32) * 0.3])
  np.testing.assert_allclose(clip_interop.adapt_position_embedding(const, 8)[1:], 0.3, rtol=1e-5)
  for method in ("bilinear", "nearest"):
    assert clip_interop.adapt_position_embedding(pos, 8, method=method).shape == (65, 16)
  with pytest.raises(ValueError):
    clip_interop.adapt_position_embedding(pos[:49], 8)


# ----------------------------------------------------------------------------- table tower

class _TorchTableTower(torch.nn.Module):
  """The reference's TabTransformerEmbedder layout (transformer + fc) at small widths."""

  def __init__(self, enable_nested_tensor=False):
    super().__init__()
    layer = torch.nn.TransformerEncoderLayer(d_model=TAB["event_dim"], nhead=TAB["heads"],
                                             dim_feedforward=TAB["ff_dim"], dropout=0.1, batch_first=True)
    self.transformer = torch.nn.TransformerEncoder(layer, TAB["layers"], enable_nested_tensor=enable_nested_tensor)
    self.fc = torch.nn.Linear(TAB["event_dim"], TAB["out_dim"])

  def forward(self, x, padding):
    return self.fc(self.transformer(x, src_key_padding_mask=padding))


def test_table_parity_torch():
  torch_tower = _randomize(_TorchTableTower(), seed=1).eval()
  sd = {k: v.detach().numpy().copy() for k, v in torch_tower.state_dict().items()}
  params = clip_interop.convert_torch_table_tower(sd)
  tower = TableTower(**TAB)
  length = 12
  rng = np.random.default_rng(2)
  valid = np.arange(length)[None, :] < np.array([12, 5, 1])[:, None]
  events = (rng.normal(size=(3, length, TAB["event_dim"])) * valid[..., None]).astype(np.float32)
  with torch.no_grad():
    ref = torch_tower(torch.from_numpy(events), torch.from_numpy(~valid)).numpy()
  perm = np.array([4, 2, 0, 3, 1] + list(range(5, length)))
  apply = jax.jit(lambda p, e, m: tower.apply({"params": p}, e, m))
  both = np.asarray(apply(params, np.concatenate([events, events[1:2, perm]]), np.concatenate([valid, valid[1:2]])))
  ours, ours_perm = both[:3], both[3:]
  err_valid = max_rel_err(ours[valid], ref[valid])
  print(f"table tower parity vs torch: valid tokens {err_valid:.2e}")
  assert err_valid <= 1e-4
  if np.isfinite(ref).all():
    err_all = max_rel_err(ours, ref)
    print(f"table tower parity vs torch: all tokens {err_all:.2e}")
    assert err_all <= 1e-4
  # Permuting the valid events permutes the outputs (no positional encoding).
  np.testing.assert_allclose(ours_perm[0, :5], ours[1, perm[:5]], rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_table_padded_slots_at_inference_vs_torch_eval():
  # torch's default TransformerEncoder (nested tensors on), as the reference builds it: in eval mode under
  # no_grad the fast path returns 0 at padded slots before fc; with gradients on it computes them.
  torch_tower = _randomize(_TorchTableTower(enable_nested_tensor=True), seed=4).eval()
  params = clip_interop.convert_torch_table_tower({k: v.detach().numpy().copy()
                                                   for k, v in torch_tower.state_dict().items()})
  rng = np.random.default_rng(5)
  valid = np.arange(10)[None, :] < np.array([10, 6, 2])[:, None]
  events = (rng.normal(size=(3, 10, TAB["event_dim"])) * valid[..., None]).astype(np.float32)
  x, padding = torch.from_numpy(events), torch.from_numpy(~valid)
  with torch.no_grad():
    ref_sampler = torch_tower(x, padding).numpy()
  ref_grad = torch_tower(x, padding).detach().numpy()     # gradients on: no fast path, dropout off (eval)
  fc_bias = torch_tower.fc.bias.detach().numpy()
  np.testing.assert_allclose(ref_sampler[~valid], np.broadcast_to(fc_bias, ref_sampler[~valid].shape), atol=1e-6)
  assert max_rel_err(ref_grad[~valid], ref_sampler[~valid]) > 0.1   # the two torch behaviours differ there

  def run(mode, deterministic):
    tower = TableTower(**TAB, padded_slots_at_inference=mode)
    return tower.apply({"params": params}, events, valid, deterministic, rngs={"dropout": jax.random.key(0)})

  run = jax.jit(run, static_argnums=(0, 1))
  err_zero, err_train = max_rel_err(run("zero", True), ref_sampler), max_rel_err(run("train", True), ref_grad)
  print(f"table tower vs torch: 'zero' vs eval+no_grad {err_zero:.2e}, 'train' vs gradients on {err_train:.2e}")
  assert err_zero <= 1e-5 and err_train <= 1e-5
  # Training (dropout active) does not depend on the option.
  np.testing.assert_array_equal(run("zero", False), run("train", False))
  with pytest.raises(ValueError, match="padded_slots_at_inference"):
    TableTower(**TAB, padded_slots_at_inference="nan").init(jax.random.key(0), events, valid)


def test_conditioner_padded_slots_from_config():
  from ehrxdiff_jax import models
  from ehrxdiff_jax.config_util import load_config
  cfg = load_config("configs/tiny.py")
  assert cfg.model.conditioner.padded_slots_at_inference == "zero"
  assert models.build_conditioner(cfg).table_tower.padded_slots_at_inference == "zero"
  assert models.build_table_tower(cfg).padded_slots_at_inference == "train"     # CLIP, table classifier
  cfg = load_config("configs/tiny.py", ["--config.model.conditioner.padded_slots_at_inference=train"])
  assert models.build_conditioner(cfg).table_tower.padded_slots_at_inference == "train"


def test_pool_tokens():
  tokens = jnp.asarray(np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3))
  mask = jnp.asarray([[True, True, False, False], [True, False, False, False]])
  np.testing.assert_allclose(pool_tokens(tokens, mask), [[1.5, 2.5, 3.5], [12, 13, 14]])
  np.testing.assert_allclose(pool_tokens(tokens, mask, "reference_sum"),
                             np.asarray(tokens).sum(1) / np.array([[2.0], [1.0]]))
  with pytest.raises(ValueError):
    pool_tokens(tokens, mask, "max")


def test_attention_dropout_masks_probabilities():
  # v[b, j, h] = one-hot(j): the attention output is the probability matrix itself, so each entry shows
  # what dropout did to one probability.
  b, lq, lk, h = 2, 3, 4, 2
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, lq, h, lk)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, lk, h, lk)), jnp.float32)
  v = jnp.broadcast_to(jnp.eye(lk)[None, :, None, :], (b, lk, h, lk))
  mask = jnp.asarray([[True] * lk, [True, True, True, False]])
  rate, n = 0.5, 2000

  @jax.jit
  def run(keys):
    attend = functools.partial(dot_product_attention, q, k, v, key_mask=mask)
    return attend(implementation="xla"), jax.vmap(lambda key: attend(dropout_rate=rate, dropout_rng=key))(keys)

  probs, outs = map(np.asarray, run(jax.random.split(jax.random.key(0), n)))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  # Every probability is either dropped or kept and scaled by 1 / (1 - rate); padding stays at zero.
  kept = np.isclose(outs, probs / (1 - rate), rtol=1e-5, atol=1e-7)
  assert np.all(kept | (outs == 0.0))
  assert np.all(outs[:, 1, :, :, -1] == 0.0)
  assert 0.47 < 1.0 - kept[:, 0].mean() < 0.53   # batch row 0 has no padding: about `rate` dropped
  # Inverted dropout is unbiased: the mean over keys is the undropped attention (5 standard errors).
  assert np.all(np.abs(outs.mean(0) - probs) <= 5 * probs * np.sqrt(rate / (1 - rate) / n) + 1e-6)
  with pytest.raises(ValueError, match="dropout_rng"):
    dot_product_attention(q, k, v, dropout_rate=rate)


def test_table_tower_attention_dropout():
  rng = np.random.default_rng(3)
  valid = np.arange(6)[None, :] < np.array([6, 2])[:, None]
  events = jnp.asarray(rng.normal(size=(2, 6, TAB["event_dim"])) * valid[..., None], jnp.float32)
  mask = jnp.asarray(valid)
  tab = {**TAB, "layers": 1}

  def apply(params, rate, attention_rate, train):
    # capture_intermediates: layer_0's attention sees the same input in train and eval, so its output
    # differs exactly when attention probabilities are dropped.
    out, inter = TableTower(**tab, dropout=rate, attention_dropout=attention_rate).apply(
        {"params": params}, events, mask, not train, rngs={"dropout": jax.random.key(1)} if train else {},
        capture_intermediates=True, mutable=["intermediates"])
    return out, inter["intermediates"]["layer_0"]["self_attn"]["__call__"][0]

  @jax.jit
  def run():
    params = TableTower(**tab).init(jax.random.key(0), events, mask)["params"]
    return [apply(params, *case) for case in ((0.1, 0.1, False), (0.1, 0.1, True), (0.0, 0.0, True),
                                              (0.1, 0.0, True))]

  ((out_eval, attn_eval), (out_train, attn_train), (out_zero, attn_zero),
   (out_no_attn, attn_no_attn)) = jax.tree.map(np.asarray, run())
  np.testing.assert_array_equal(out_zero, out_eval)
  np.testing.assert_array_equal(attn_zero, attn_eval)
  assert not np.allclose(attn_train, attn_eval, atol=1e-3)
  assert not np.allclose(out_train, out_eval, atol=1e-3)
  # attention_dropout=0 keeps the attention site exact while the other dropout sites still act.
  np.testing.assert_allclose(attn_no_attn, attn_eval, rtol=1e-6, atol=1e-6)
  assert not np.allclose(out_no_attn, out_eval, atol=1e-3)


def test_remat_block_same_shapes(tiny_config):
  m = tiny_config.model
  args = _inputs(tiny_config, abstract=True)
  for remat in ("none", "block"):
    vit = VisionTransformer(**m.image_tower.to_dict(), remat=remat)
    tab = TableTower(**m.table_tower.to_dict(), remat=remat)
    v_vit = jax.eval_shape(vit.init, jax.random.key(0), args[0])
    v_tab = jax.eval_shape(tab.init, jax.random.key(0), args[2], args[3])
    out = jax.eval_shape(lambda v, e, m: tab.apply(v, e, m, False, rngs={"dropout": jax.random.key(1)}),
                         v_tab, args[2], args[3])
    assert out.shape == (2, 32, 64)
    if remat == "none":
      ref = (_shapes(v_vit), _shapes(v_tab))
    else:
      assert (_shapes(v_vit), _shapes(v_tab)) == ref


# ----------------------------------------------------------------------------- reference checkpoints

def _table_to_torch(p: dict, prefix: str) -> dict:
  """Our table tower params -> the reference TabTransformerEmbedder names (inverse of the converter)."""
  out = {}
  for name, layer in p.items():
    if name == "fc":
      out[prefix + "fc.weight"], out[prefix + "fc.bias"] = layer["kernel"].T, layer["bias"]
      continue
    i = int(name.split("_")[1])
    t = f"{prefix}transformer.layers.{i}."
    a = layer["self_attn"]
    out[t + "self_attn.in_proj_weight"] = np.concatenate([a[n]["kernel"].T for n in "qkv"])
    out[t + "self_attn.in_proj_bias"] = np.concatenate([a[n]["bias"] for n in "qkv"])
    out[t + "self_attn.out_proj.weight"], out[t + "self_attn.out_proj.bias"] = a["out"]["kernel"].T, a["out"]["bias"]
    for lin in ("linear1", "linear2"):
      out[f"{t}{lin}.weight"], out[f"{t}{lin}.bias"] = layer[lin]["kernel"].T, layer[lin]["bias"]
    for norm in ("norm1", "norm2"):
      out[f"{t}{norm}.weight"], out[f"{t}{norm}.bias"] = layer[norm]["scale"], layer[norm]["bias"]
  return out


def _vit_to_openai(img: dict) -> dict:
  """Our image tower params -> OpenAI `VisualTransformer` names (inverse of the converter; ln_post made up)."""
  width = img["class_embedding"].shape[0]
  out = {"conv1.weight": img["patch_embed"]["kernel"].transpose(3, 2, 0, 1), "class_embedding": img["class_embedding"],
         "positional_embedding": img["positional_embedding"], "ln_pre.weight": img["ln_pre"]["scale"],
         "ln_pre.bias": img["ln_pre"]["bias"], "ln_post.weight": np.ones(width, np.float32),
         "ln_post.bias": np.zeros(width, np.float32)}
  for i in range(sum(1 for n in img if n.startswith("blocks_"))):
    b, o = img[f"blocks_{i}"], f"transformer.resblocks.{i}."
    out[o + "attn.in_proj_weight"] = np.concatenate([b["attn"][n]["kernel"].T for n in "qkv"])
    out[o + "attn.in_proj_bias"] = np.concatenate([b["attn"][n]["bias"] for n in "qkv"])
    out[o + "attn.out_proj.weight"] = b["attn"]["out"]["kernel"].T
    out[o + "attn.out_proj.bias"] = b["attn"]["out"]["bias"]
    for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
      out[f"{o}{theirs}.weight"], out[f"{o}{theirs}.bias"] = b[ours]["scale"], b[ours]["bias"]
    for ours, theirs in (("fc1", "mlp.c_fc"), ("fc2", "mlp.c_proj")):
      out[f"{o}{theirs}.weight"], out[f"{o}{theirs}.bias"] = b[ours]["kernel"].T, b[ours]["bias"]
  return out


@pytest.fixture(scope="module")
def tiny_cond_params(tiny_config):
  cond = _build_conditioner(tiny_config)
  params = jax.jit(cond.init)(jax.random.key(3), *_inputs(tiny_config))["params"]
  return cond, jax.tree_util.tree_map(np.asarray, nn.unbox(params))


def test_reference_conditioner_roundtrip(tiny_config, tiny_cond_params):
  cond, params = tiny_cond_params
  openai = _vit_to_openai(params["image_tower"])
  sd = {"cond_stage_model.clip_img_encoder." + k: v for k, v in openai.items()}
  sd.update(_table_to_torch(params["table_tower"], "cond_stage_model.clip_tab_encoder."))
  for ours, theirs in (("vae_proj", "vae_projector"), ("adapter", "adaptor")):
    sd[f"cond_stage_model.{theirs}.weight"] = params[ours]["kernel"].T
    sd[f"cond_stage_model.{theirs}.bias"] = params[ours]["bias"]
  sd["cond_stage_model.autoencoder.encoder.conv_in.weight"] = np.zeros((4, 3, 3, 3), np.float32)
  sd["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((4, 3, 3, 3), np.float32)
  expected = jax.eval_shape(cond.init, jax.random.key(0), *_inputs(tiny_config, abstract=True))["params"]
  got = clip_interop.convert_reference_conditioner(sd, expected=expected)
  _assert_trees_equal(got, params)
  _assert_trees_equal(clip_interop.convert_reference_conditioner(sd), params)
  # An ablation checkpoint (the reference's TabAdaptor: table + VAE) converts to just those parts.
  tab_vae = {k: v for k, v in sd.items() if ".clip_img_encoder." not in k}
  assert set(clip_interop.convert_reference_conditioner(tab_vae)) == {"table_tower", "vae_proj", "adapter"}

  # The CLIP-pretraining checkpoint names.
  clip_sd = {"model.visual." + k: v for k, v in openai.items()}
  clip_sd.update(_table_to_torch(params["table_tower"], "model.transformer."))
  clip_sd.update({"model.logit_scale": np.array(np.log(1 / 0.07), np.float32),
                  "model.token_embedding.weight": np.zeros((10, 8), np.float32),
                  "model.ln_final.weight": np.ones(8, np.float32), "model.ln_final.bias": np.zeros(8, np.float32)})
  clip = clip_interop.convert_reference_clip(clip_sd)
  _assert_trees_equal(clip["table_tower"], params["table_tower"])
  assert set(clip["image_tower"]) == set(params["image_tower"]) | {"ln_post"}
  np.testing.assert_allclose(clip["logit_scale"], np.log(1 / 0.07), rtol=1e-6)


def test_conversion_errors_name_the_key(hf_vision):
  _, sd = hf_vision
  missing = dict(sd)
  del missing["encoder.layers.1.mlp.fc2.bias"]
  with pytest.raises(ConversionError, match=r"encoder\.layers\.1\.mlp\.fc2\.bias"):
    clip_interop.convert_hf_clip_vision(missing)
  extra = dict(sd, **{"encoder.layers.0.self_attn.rotary.weight": np.zeros(3, np.float32)})
  with pytest.raises(ConversionError, match=r"encoder\.layers\.0\.self_attn\.rotary\.weight"):
    clip_interop.convert_hf_clip_vision(extra)
  gap = {k.replace("encoder.layers.1.", "encoder.layers.2."): v for k, v in sd.items()}
  with pytest.raises(ConversionError, match=r"encoder\.layers are not contiguous from 0: \[0, 2\]"):
    clip_interop.convert_hf_clip_vision(gap)
  expected = jax.eval_shape(VisionTransformer(**{**VIT, "mlp_dim": 128}).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32))["params"]
  with pytest.raises(ConversionError, match=r"encoder\.layers\.0\.mlp\.fc1\.weight"):
    clip_interop.convert_hf_clip_vision(sd, include_ln_post=False, expected=expected)
  openai = _to_openai(sd, "visual.")
  openai["visual.transformer.resblocks.0.attn.in_proj_weight"] = openai[
      "visual.transformer.resblocks.0.attn.in_proj_weight"][:-1]
  with pytest.raises(ConversionError, match=r"resblocks\.0\.attn\.in_proj_weight"):
    clip_interop.convert_openai_clip_visual(openai)
  with pytest.raises(ConversionError, match="cond_stage_model"):
    clip_interop.convert_reference_conditioner({"model.x": np.zeros(1)})
