"""The offline hashing embedder (data_prep/embed.py): deterministic, and numbers embed by value."""
import numpy as np

from data_prep.embed import embed_texts, hashing_embed, make_embedder

WBC = "labevents itemid white blood cells valuenum {} valueuom k/ul"


def _cos(a, b):
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_nearby_values_embed_closer_than_distant_ones():
  e = hashing_embed([WBC.format(x) for x in (14.2, 14.8, 4.1, 140.0)], 256)
  near, far, farther = _cos(e[0], e[1]), _cos(e[0], e[2]), _cos(e[0], e[3])
  assert near > far + 0.05 > farther + 0.05
  # Monotone over a sweep: similarity to 10 falls as the value moves away on either side.
  sweep = hashing_embed([WBC.format(x) for x in (10.0, 12.0, 16.0, 25.0, 60.0)], 256)
  sims = [_cos(sweep[0], v) for v in sweep[1:]]
  assert sims == sorted(sims, reverse=True)
  lower = hashing_embed([WBC.format(x) for x in (10.0, 8.0, 5.0, 2.0)], 256)
  sims = [_cos(lower[0], v) for v in lower[1:]]
  assert sims == sorted(sims, reverse=True)


def test_comparisons_and_percentages_are_numbers():
  mic = "microbiologyevents org_name e. coli ab_name ceftriaxone dilution_text {}"
  e = hashing_embed([mic.format("<=2"), mic.format("<=4"), mic.format(">=64")], 256)
  assert _cos(e[0], e[1]) > _cos(e[0], e[2]) + 0.05


def test_deterministic_normalised_and_versioned(tmp_path):
  texts = [WBC.format(7.5), "prescriptions drug furosemide dose_val_rx 40 dose_unit_rx mg", ""]
  e1, e2 = hashing_embed(texts, 64), hashing_embed(texts, 64)
  np.testing.assert_array_equal(e1, e2)
  np.testing.assert_allclose(np.linalg.norm(e1[:2], axis=1), 1.0, rtol=1e-6)
  assert not e1[2].any()
  emb = make_embedder("hashing", 64)
  assert emb.name == "hashing-64-v2"  # the cache key changes with the features (v1 caches are not reused)
  cached = embed_texts(texts, emb, cache_dir=str(tmp_path))
  again = embed_texts(texts, emb, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(cached, again)
  np.testing.assert_allclose(cached, e1.astype(np.float16))
