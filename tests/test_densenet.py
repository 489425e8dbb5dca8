"""XRVDenseNet parity with torchxrayvision's DenseNet-121 (random weights, random BatchNorm statistics).

torchxrayvision cannot be imported beside this torch build (its torchvision dependency fails to load),
so the peer is used only when it imports; otherwise `_TorchXRVDenseNet` below restates its DenseNet
(torchxrayvision.models.DenseNet / _DenseLayer / _Transition / op_norm) in plain PyTorch, with the same
module names so that the state dict is the one torchxrayvision writes.
"""
import os
from collections import OrderedDict

import jax
import numpy as np
import pytest

import flax.linen as nn
from parity import max_rel_err, nhwc_to_nchw
from ehrxdiff_jax.interop.common import check_against
from ehrxdiff_jax.evaluate import densenet as D
from ehrxdiff_jax.interop.densenet import convert_xrv_densenet, load_xrv_densenet

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

OP_THRESHS = [0.07, 0.04, 0.1, 0.01, 0.02, 0.002, 0.01, 0.1, 0.06, 0.03, 0.05, 0.02, 0.02, 0.04,
              float("nan"), 0.04, 0.2, 0.05]


class _TorchDenseLayer(tnn.Sequential):
  def __init__(self, cin, growth, bn_size):
    super().__init__()
    self.add_module("norm1", tnn.BatchNorm2d(cin))
    self.add_module("relu1", tnn.ReLU())
    self.add_module("conv1", tnn.Conv2d(cin, bn_size * growth, 1, bias=False))
    self.add_module("norm2", tnn.BatchNorm2d(bn_size * growth))
    self.add_module("relu2", tnn.ReLU())
    self.add_module("conv2", tnn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False))

  def forward(self, x):
    return torch.cat([x, super().forward(x)], 1)


class _TorchXRVDenseNet(tnn.Module):
  def __init__(self, growth=32, block_config=(6, 12, 24, 16), init=64, bn_size=4, num_classes=18,
               op_threshs=None, apply_sigmoid=False):
    super().__init__()
    self.apply_sigmoid = apply_sigmoid
    self.features = tnn.Sequential(OrderedDict([
        ("conv0", tnn.Conv2d(1, init, 7, stride=2, padding=3, bias=False)),
        ("norm0", tnn.BatchNorm2d(init)), ("relu0", tnn.ReLU()),
        ("pool0", tnn.MaxPool2d(3, stride=2, padding=1))]))
    c = init
    for i, n in enumerate(block_config):
      block = tnn.Sequential(OrderedDict(
          [(f"denselayer{j + 1}", _TorchDenseLayer(c + j * growth, growth, bn_size)) for j in range(n)]))
      self.features.add_module(f"denseblock{i + 1}", block)
      c += n * growth
      if i != len(block_config) - 1:
        self.features.add_module(f"transition{i + 1}", tnn.Sequential(OrderedDict([
            ("norm", tnn.BatchNorm2d(c)), ("relu", tnn.ReLU()), ("conv", tnn.Conv2d(c, c // 2, 1, bias=False)),
            ("pool", tnn.AvgPool2d(2, stride=2))])))
        c //= 2
    self.features.add_module("norm5", tnn.BatchNorm2d(c))
    self.classifier = tnn.Linear(c, num_classes)
    self.register_buffer("op_threshs", op_threshs)

  def features2(self, x):
    f = self.features(x)
    return F.adaptive_avg_pool2d(F.relu(f), (1, 1)).view(f.size(0), -1)

  def forward(self, x):
    out = self.classifier(self.features2(x))
    if self.op_threshs is not None:
      out = torch.sigmoid(out)
      t = self.op_threshs.expand(out.shape[0], -1)
      new = torch.zeros(out.shape) + 0.5
      leq = (out < t) & ~torch.isnan(t)
      gt = ~(out < t) & ~torch.isnan(t)
      new[leq] = out[leq] / (t[leq] * 2)
      new[gt] = 1.0 - ((1.0 - out[gt]) / ((1 - t[gt]) * 2))
      out = new
    elif self.apply_sigmoid:
      out = torch.sigmoid(out)
    return out


def _torch_peer(**kw):
  try:
    import torchxrayvision as xrv  # noqa: F401  (only used where it imports)
    model = xrv.models.DenseNet(weights=None, **kw)
    peer = "torchxrayvision"
  except Exception:
    model = _TorchXRVDenseNet(**kw)
    peer = "restated"
  return model, peer


def _randomise(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, tnn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.8 + 0.6)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
      elif isinstance(m, tnn.Linear):
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
  return model.eval()


def _parity(cfg, size, seed=0):
  torch.manual_seed(seed)
  peer, kind = _torch_peer(**cfg)
  peer = _randomise(peer, seed)
  x = (np.random.default_rng(seed).uniform(-1024, 1024, (2, size, size, 1))).astype(np.float32)
  with torch.no_grad():
    xt = torch.from_numpy(nhwc_to_nchw(x).copy())
    ref_feats = peer.features2(xt).numpy()
    ref_out = peer(xt).numpy()
  r = convert_xrv_densenet(peer.state_dict())
  model = D.XRVDenseNet(**r["config"])
  variables = {"params": r["params"], "batch_stats": r["batch_stats"]}
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  variables = check_against(variables, nn.meta.unbox(expected))
  out, feats = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, x)
  ef, eo = max_rel_err(feats, ref_feats), max_rel_err(out, ref_out)
  print(f"DenseNet {r['config']['block_config']} parity vs {kind} peer at {size}x{size}: "
        f"features {ef:.2e}, logits {eo:.2e}")
  assert ef <= 1e-4 and eo <= 1e-4
  # the op_threshs head (xrv op_norm, NaN thresholds -> 0.5) on the same logits
  sig = 1 / (1 + np.exp(-np.asarray(out, np.float64)))
  with torch.no_grad():
    peer.op_threshs = torch.tensor(OP_THRESHS)
    ref_op = peer(torch.from_numpy(nhwc_to_nchw(x).copy())).numpy()
    peer.op_threshs = None
  got_op = np.asarray(D.op_norm(sig.astype(np.float32), np.asarray(OP_THRESHS, np.float32)))
  assert max_rel_err(got_op, ref_op) <= 1e-4
  assert np.all(got_op[:, 14] == 0.5)
  return r, feats, out


def test_densenet_parity_reduced_depth():
  """Every layer kind of DenseNet-121 at full width (growth 32, bn_size 4, 64 stem channels), 2 layers
  per block: fast to compile."""
  r, feats, out = _parity(dict(block_config=(2, 2, 2, 2)), 64)
  assert feats.shape == (2, 128)  # 64 -> 128 -> 64 -> 128 -> 64 -> 128 -> 64 -> 128
  assert out.shape == (2, 18)


@pytest.mark.slow
def test_densenet121_parity():
  """The full DenseNet-121 (6, 12, 24, 16) at 64x64 (fully convolutional until the pooling)."""
  r, feats, out = _parity({}, 64, seed=1)
  assert r["config"] == {"block_config": (6, 12, 24, 16), "growth_rate": 32, "bn_size": 4,
                         "num_init_features": 64, "num_classes": 18}
  assert feats.shape == (2, 1024) and out.shape == (2, 18)


def _random_variables(model, x, seed=0):
  """Random variables of the right shapes without compiling the initialiser (slow on busy CPUs)."""
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "var":
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    scale = 0.05 if name in ("cls_token", "pos_embed", "bias", "mean") else 1.0 / np.sqrt(max(1, np.prod(s.shape[:-1])))
    return (rng.normal(size=s.shape) * scale + (1.0 if name == "scale" else 0.0)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_densenet_heads_and_features_method():
  model = D.XRVDenseNet(block_config=(1, 1), growth_rate=4, num_init_features=8, bn_size=2, num_classes=18)
  x = np.random.default_rng(1).normal(0, 500, (2, 32, 32, 1)).astype(np.float32)
  v = _random_variables(model, x)
  sig_model = D.XRVDenseNet(**{**_small_cfg(), "apply_sigmoid": True})
  (logits, feats), feats2, sig = jax.jit(lambda v, x: (
      model.apply(v, x, return_features=True), model.apply(v, x, method="features"), sig_model.apply(v, x)))(v, x)
  assert feats.shape == (2, 10) and logits.shape == (2, 18)  # 8 -> 12 -> 6 -> 10 channels
  np.testing.assert_allclose(feats2, feats, rtol=1e-6)
  np.testing.assert_allclose(sig, jax.nn.sigmoid(logits), rtol=1e-6)


def _small_cfg():
  return dict(block_config=(1, 1), growth_rate=4, num_init_features=8, bn_size=2, num_classes=18)


def test_load_xrv_densenet_file_and_leftovers(tmp_path):
  peer = _randomise(_TorchXRVDenseNet(growth=4, block_config=(1, 2), init=8, bn_size=2,
                                      op_threshs=torch.tensor(OP_THRESHS)))
  path = os.path.join(tmp_path, "xrv.pt")
  torch.save(peer.state_dict(), path)
  model, variables = load_xrv_densenet(path)
  assert tuple(model.block_config) == (1, 2) and model.op_threshs is not None
  x = np.random.default_rng(2).uniform(-1024, 1024, (1, 32, 32, 1)).astype(np.float32)
  with torch.no_grad():
    ref = peer(torch.from_numpy(nhwc_to_nchw(x).copy())).numpy()
  assert max_rel_err(jax.jit(model.apply)(variables, x), ref) <= 1e-4
  sd = dict(peer.state_dict())
  sd["features.extra.weight"] = torch.zeros(1)
  from ehrxdiff_jax.interop.common import ConversionError
  with pytest.raises(ConversionError, match="extra"):
    convert_xrv_densenet(sd)


def test_xrv_preprocess_scaling_and_size():
  img = np.zeros((1, 256, 256, 3), np.float32)
  img[:, :, :128] = 1.0
  img[:, :, 128:] = -1.0
  out = D.xrv_preprocess(img)
  assert out.shape == (1, 224, 224, 1) and out.dtype == np.float32
  assert out[0, 112, 10, 0] == pytest.approx(1024.0) and out[0, 112, 200, 0] == pytest.approx(-1024.0)
  same = D.xrv_preprocess(img[:, :224, :224])
  assert same[0, 0, 0, 0] == pytest.approx(1024.0)


def test_xrv_preprocess_matches_skimage_resize():
  transform = pytest.importorskip("skimage.transform")
  rng = np.random.default_rng(3)
  img = rng.uniform(-1, 1, (1, 256, 256, 1)).astype(np.float32)
  ref = transform.resize(img[0, :, :, 0][None] * 1024.0, (1, 224, 224), mode="constant",
                         preserve_range=True).astype(np.float32)
  np.testing.assert_allclose(D.xrv_preprocess(img)[0, :, :, 0], ref[0], atol=1e-2)


# ------------------------------------------------------------------ Chest ImaGenome ViT classifier
from ehrxdiff_jax.evaluate import vit_classifier as V  # noqa: E402


def test_vit_paper_size_parameter_count():
  model = V.ViTFindingClassifier()
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32))
  params = nn.meta.unbox(shapes)["params"]
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(t))
  heads = {k: v for k, v in params.items() if k.startswith("head_")}
  assert len(heads) == 10
  # DINO vit_small/16 without its classification head; heads 1536 -> 768 -> 768 -> 2 each
  assert count(params) - count(heads) == 21_665_664
  assert count(heads) == 10 * 1_772_546


def test_vit_tiny_forward_loss_and_grad():
  model = V.ViTFindingClassifier(image_size=32, patch_size=8, width=32, layers=2, heads=2, num_findings=4,
                                 n_last_blocks=2, attention="xla")
  x = V.imagenome_preprocess(np.random.default_rng(0).uniform(-1, 1, (3, 40, 40, 3)), size=32)
  assert x.shape == (3, 32, 32, 3)
  params = _random_variables(model, x)
  labels = np.array([[1, 0, np.nan, 1], [0, np.nan, np.nan, 1], [1, 1, 0, 0]], np.float32)
  mask = np.array([[True, True, True, False]] * 3)

  def loss_fn(p):
    logits = model.apply(p, x)
    two = model.apply(p, x, return_two_class=True)
    emb = model.apply(p, x, method="embed")
    return V.multilabel_bce(logits, labels), (logits, two, emb, V.multilabel_bce(logits, labels, mask))

  (loss, (logits, two, emb, loss_m)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert logits.shape == (3, 4) and two.shape == (3, 4, 2) and emb.shape == (3, 64)
  np.testing.assert_allclose(V.finding_probabilities(logits), jax.nn.softmax(two, axis=-1)[..., 1], atol=1e-6)
  # equals the reference's 2-class cross entropy averaged over the known (and unmasked) labels
  logp = np.asarray(jax.nn.log_softmax(two, axis=-1))
  for value, keep in ((loss, ~np.isnan(labels)), (loss_m, ~np.isnan(labels) & mask)):
    ce = -np.mean(np.where(labels[keep] == 1, logp[..., 1][keep], logp[..., 0][keep]))
    assert float(value) == pytest.approx(ce, rel=1e-5)
  assert float(V.multilabel_bce(np.asarray(logits), np.full_like(labels, np.nan))) == 0.0
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


class _TorchDinoViT(torch.nn.Module):
  """The reference's DINO VisionTransformer (vit_small layout, tiny) + FeatureClassifier heads, restated."""

  def __init__(self, img=32, patch=8, dim=32, depth=3, heads=2, findings=("a b", "c/d"), n_last=2):
    super().__init__()
    self.heads, self.n_last, self.findings = heads, n_last, findings
    self.patch_embed = tnn.Module()
    self.patch_embed.proj = tnn.Conv2d(3, dim, patch, stride=patch)
    self.cls_token = tnn.Parameter(torch.randn(1, 1, dim) * 0.1)
    self.pos_embed = tnn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.1)
    self.blocks = tnn.ModuleList()
    for _ in range(depth):
      blk = tnn.Module()
      blk.norm1, blk.norm2 = tnn.LayerNorm(dim, eps=1e-6), tnn.LayerNorm(dim, eps=1e-6)
      blk.attn = tnn.Module()
      blk.attn.qkv, blk.attn.proj = tnn.Linear(dim, 3 * dim), tnn.Linear(dim, dim)
      blk.mlp = tnn.Module()
      blk.mlp.fc1, blk.mlp.fc2 = tnn.Linear(dim, 4 * dim), tnn.Linear(4 * dim, dim)
      self.blocks.append(blk)
    self.norm = tnn.LayerNorm(dim, eps=1e-6)
    e = dim * n_last

    def block(i, o):
      m = tnn.Module()
      m.linear_block = tnn.Sequential(tnn.Linear(i, o))
      return m
    self.mlps = tnn.ModuleDict()
    for f in findings:
      head = tnn.Module()
      head.mlp = tnn.Sequential(block(e, e // 2), block(e // 2, e // 2), block(e // 2, 2))
      self.mlps[f] = head

  def forward(self, x):
    b = x.shape[0]
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1) + self.pos_embed
    outs = []
    for i, blk in enumerate(self.blocks):
      h = blk.norm1(x)
      n, c = h.shape[1], h.shape[2]
      qkv = blk.attn.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
      att = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
      x = x + blk.attn.proj((att @ qkv[2]).transpose(1, 2).reshape(b, n, c))
      x = x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
      if len(self.blocks) - i <= self.n_last:
        outs.append(self.norm(x))
    emb = torch.cat([o[:, 0] for o in outs], -1)
    res = []
    for f in self.findings:
      h = emb
      for j, m in enumerate(self.mlps[f].mlp):
        h = m.linear_block(h)
        h = F.relu(h) if j < 2 else h
      res.append(h)
    return torch.stack(res, 1)  # [B, F, 2]


def test_vit_classifier_parity_with_reference_layout():
  torch.manual_seed(0)
  peer = _TorchDinoViT().eval()
  with torch.no_grad():
    for p in peer.parameters():
      if p.dim() == 1:
        p.add_(torch.randn(p.shape) * 0.1)
  sd = peer.state_dict()
  model_sd = {k: v for k, v in sd.items() if not k.startswith("mlps.")}
  mlps_sd = {k[len("mlps."):]: v for k, v in sd.items() if k.startswith("mlps.")}
  params = V.convert_reference_classifier(model_sd, mlps_sd, peer.findings, layers=3)
  model = V.ViTFindingClassifier(image_size=32, patch_size=8, width=32, layers=3, heads=2, num_findings=2,
                                 n_last_blocks=2, attention="xla")
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32)))
  params = check_against({"params": params}, shapes)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref = peer(torch.from_numpy(nhwc_to_nchw(x).copy())).numpy()
  two = jax.jit(lambda p, x: model.apply(p, x, return_two_class=True))(params, x)
  err = max_rel_err(two, ref)
  print(f"ViT classifier parity (restated reference, tiny): {err:.2e}")
  assert err <= 1e-4
