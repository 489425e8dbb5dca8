"""Helpers for parity tests against PyTorch peers."""
import numpy as np


def max_rel_err(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|: the relative error the parity tests bound."""
  ours = np.asarray(ours, np.float64)
  theirs = np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / (np.max(np.abs(theirs)) + 1e-12))


def nchw_to_nhwc(x):
  return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
  return np.transpose(np.asarray(x), (0, 3, 1, 2))
