"""torchxrayvision / torchvision DenseNet state dict -> variables of evaluate.densenet.XRVDenseNet.

Torch names: features.conv0, features.norm0, features.denseblockI.denselayerJ.{norm1, conv1, norm2,
conv2}, features.transitionI.{norm, conv}, features.norm5, classifier; BatchNorm running_mean /
running_var go to `batch_stats` (num_batches_tracked is dropped); an `op_threshs` buffer, when the file
has one, is returned separately. torchvision's old-style names (norm.1, conv.1, ...) are accepted too.

torchxrayvision ships its weights as pickled whole models, which `torch.load(weights_only=True)` refuses.
Save a plain state dict once where torchxrayvision is installed:
    torch.save(xrv.models.DenseNet(weights="densenet121-res224-all").state_dict(), "xrv_all.pt")
and load it here with `load_xrv_densenet("xrv_all.pt")`.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from ehrxdiff_jax.interop.common import ConversionError, StateDict, load_state_dict

def _normalise_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Strips a 'module.' / 'model.' wrapper prefix and maps torchvision's 'norm.1' to 'norm1'."""
  out = {}
  for k, v in state_dict.items():
    for wrapper in ("module.", "model."):
      if k.startswith(wrapper) and (k[len(wrapper):].startswith("features.") or k[len(wrapper):].startswith("classifier")):
        k = k[len(wrapper):]
    k = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.(\d)\.", r"\1\2.", k)
    out[k] = v
  return out


def _bn(sd: StateDict, key: str, params: dict, stats: dict, name: str) -> None:
  params[name] = {"scale": sd.take(f"{key}.weight"), "bias": sd.take(f"{key}.bias")}
  stats[name] = {"mean": sd.take(f"{key}.running_mean"), "var": sd.take(f"{key}.running_var")}
  sd.skip(f"{key}.num_batches_tracked")


def infer_block_config(state_dict: Mapping[str, Any]) -> tuple[int, ...]:
  """Number of dense layers per block, read off the state dict names."""
  counts: dict[int, int] = {}
  for k in _normalise_names(state_dict):
    m = re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", k)
    if m:
      b, l = int(m.group(1)), int(m.group(2))
      counts[b] = max(counts.get(b, 0), l)
  if not counts:
    raise ConversionError("no features.denseblockN.denselayerM keys: not a DenseNet state dict")
  return tuple(counts[b] for b in sorted(counts))


def convert_xrv_densenet(state_dict: Mapping[str, Any], block_config: Sequence[int] | None = None) -> dict:
  """Returns {'params', 'batch_stats', 'op_threshs' (np.ndarray or None), 'config'}: `config` holds the
  XRVDenseNet fields read off the shapes (block_config, growth_rate, bn_size, num_init_features,
  num_classes), so `XRVDenseNet(**r['config']).apply({'params': r['params'], 'batch_stats':
  r['batch_stats']}, x)` runs the converted network."""
  state_dict = _normalise_names(state_dict)
  block_config = tuple(block_config) if block_config is not None else infer_block_config(state_dict)
  sd = StateDict(state_dict)
  params: dict = {}
  stats: dict = {}
  params["conv0"] = sd.conv("features.conv0", bias=False)
  _bn(sd, "features.norm0", params, stats, "norm0")
  for i, n_layers in enumerate(block_config):
    bp, bs = {}, {}
    for j in range(n_layers):
      key = f"features.denseblock{i + 1}.denselayer{j + 1}"
      lp, ls = {}, {}
      _bn(sd, f"{key}.norm1", lp, ls, "norm1")
      lp["conv1"] = sd.conv(f"{key}.conv1", bias=False)
      _bn(sd, f"{key}.norm2", lp, ls, "norm2")
      lp["conv2"] = sd.conv(f"{key}.conv2", bias=False)
      bp[f"denselayer{j + 1}"], bs[f"denselayer{j + 1}"] = lp, ls
    params[f"denseblock{i + 1}"], stats[f"denseblock{i + 1}"] = bp, bs
    if i != len(block_config) - 1:
      tp, ts = {}, {}
      _bn(sd, f"features.transition{i + 1}.norm", tp, ts, "norm")
      tp["conv"] = sd.conv(f"features.transition{i + 1}.conv", bias=False)
      params[f"transition{i + 1}"], stats[f"transition{i + 1}"] = tp, ts
  _bn(sd, "features.norm5", params, stats, "norm5")
  params["classifier"] = sd.linear("classifier")
  op_threshs = None
  if sd.has("op_threshs"):
    op_threshs = sd.take("op_threshs")
  sd.finish()
  growth = int(params["denseblock1"]["denselayer1"]["conv2"]["kernel"].shape[3])
  return {"params": params, "batch_stats": stats, "op_threshs": op_threshs,
          "config": {"block_config": block_config, "growth_rate": growth,
                     "bn_size": int(params["denseblock1"]["denselayer1"]["conv1"]["kernel"].shape[3]) // growth,
                     "num_init_features": int(params["conv0"]["kernel"].shape[3]),
                     "num_classes": int(params["classifier"]["kernel"].shape[1])}}


def load_xrv_densenet(path: str | os.PathLike, *, check: bool = True):
  """Reads a DenseNet state dict file (`torch.load(weights_only=True)` / safetensors) and returns
  (model, variables): an XRVDenseNet configured from the file (with its op_threshs when saved) and
  {'params', 'batch_stats'} checked against the network's shapes."""
  import jax
  import jax.numpy as jnp

  from ehrxdiff_jax.evaluate.densenet import XRVDenseNet
  from ehrxdiff_jax.interop.common import check_against

  r = convert_xrv_densenet(load_state_dict(path))
  in_channels = r["params"]["conv0"]["kernel"].shape[2]
  op = None if r["op_threshs"] is None else tuple(float(t) for t in np.asarray(r["op_threshs"]).ravel())
  model = XRVDenseNet(**r["config"], op_threshs=op)
  variables = {"params": r["params"], "batch_stats": r["batch_stats"]}
  if check:
    import flax.linen as nn
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, in_channels)))
    variables = check_against(variables, nn.meta.unbox(expected))
  return model, variables
