"""`ehrxdiff prepare`: MIMIC-IV 2.2 + MIMIC-CXR-JPG 2.0.0 -> ArrayRecord shards of (I_prev, S_event, I_trg).

    ehrxdiff prepare --mimic-iv DIR --mimic-cxr DIR --chest-imagenome DIR --out DIR [--image-size 256]
        [--event-dim 1536] [--max-events 1024] [--embedder hashing|local:PATH|precomputed:FILE] [--split-file F]
        [--labels chexpert,imagenome] [--imagenome-file CSV] [--workers N] [--overwrite]
        [--vae-checkpoint PATH [--vae-config FILE] [--latents-batch N]]

Steps: cohort (data_prep/cohort.py) -> streamed events (events.py) -> embeddings (embed.py) -> images
(images.py) -> patient-disjoint splits -> labels -> [cached VAE latents (latents.py)] -> shards + manifest
(write.py). Each record's JSON meta carries the demographics `age` (years at admission), `sex` ('F' | 'M')
and `race` (admissions.race) where known, for the evaluation only (never logged).

Chest ImaGenome labels (`imagenome`) come from the release (`--chest-imagenome`, read by
data_prep/imagenome.py with the reference's rule) or from a per-image CSV (`--imagenome-file`, a convenience
format). The release's gold-set patients get `imagenome_gold: true` in their records' meta: the findings
classifier's training ignores their labels, as the reference leaves them out of its training split
(train/image_classifier.py). The output directory:

    manifest.json              schema version, counts, options, input fingerprints, drop counters, tables
    dataset_info.json, features.json   TFDS metadata (tfds.builder_from_directory / tfds.data_source)
    ehrxdiff-<split>.array_record-NNNNN-of-NNNNN   records (ehrxdiff_jax/records.py)
    index-<split>.jsonl        one line per record, in record order: key, ids, times, demographics, ...
    table1.csv, table5.csv     the paper's Table 1 and the events-per-sample statistics of Table 5
    event_table.npy            only with --event-layout table: float16 [U, D] shared event vectors
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pandas as pd

from data_prep import cohort as cohort_lib
from data_prep import embed as embed_lib
from data_prep import events as events_lib
from data_prep import imagenome as imagenome_lib
from data_prep import images as images_lib
from data_prep import latents as latents_lib
from data_prep import schema
from data_prep import write as write_lib
from data_prep.tables import Counters, find_file, fingerprint, read_table
from ehrxdiff_jax import outputs
from ehrxdiff_jax import records as rec
from ehrxdiff_jax.errors import UserError

SPLITS = ("train", "valid", "test")
CXR_META = "mimic-cxr-2.0.0-metadata"
CXR_CHEXPERT = "mimic-cxr-2.0.0-chexpert"


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--mimic-iv", required=True, help="MIMIC-IV 2.2 root (holds hosp/ and icu/)")
  p.add_argument("--mimic-cxr", required=True, help="MIMIC-CXR-JPG 2.0.0 root (metadata CSVs and files/)")
  p.add_argument("--out", required=True, help="output dataset directory")
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument("--resize", choices=["squash", "pad"], default="squash",
                 help="squash (reference) or pad to a square keeping the aspect ratio")
  p.add_argument("--event-dim", type=int, default=1536)
  p.add_argument("--max-events", type=int, default=1024)
  p.add_argument("--window-hours", type=float, default=None, help="default: the filter file's (48)")
  p.add_argument("--min-age", type=float, default=None, help="default: the filter file's (18)")
  p.add_argument("--embedder", default="hashing", help="hashing | local:PATH | precomputed:FILE")
  p.add_argument("--filters", default=None, help="event filter JSON (default: data_prep/event_filters.json)")
  p.add_argument("--split-file", default=None,
                 help="CSV with subject_id,split (or MIMIC-CXR's dicom_id,...,split: by target image) "
                      "or JSON {split: [subject_id, ...]}")
  p.add_argument("--split-fractions", default="0.9,0.05,0.05")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--labels", default="chexpert,imagenome",
                 help="comma list of label sets to carry: chexpert, imagenome ('' for none)")
  p.add_argument("--chest-imagenome", default=None,
                 help="Chest ImaGenome 1.0.0 release root (silver_dataset/scene_tabular/"
                      "attribute_relations_tabular.txt, gold_dataset/): the 'imagenome' labels")
  p.add_argument("--imagenome-file", default=None,
                 help="instead of --chest-imagenome: a per-image CSV with dicom_id and the 10 label columns "
                      "(1 / 0 / empty; convenience format, no gold set)")
  p.add_argument("--image-codec", choices=["png", "raw"], default="raw",
                 help="raw uint8 (default: with zstd shards about as small as PNG, 10x faster to decode)")
  p.add_argument("--event-codec", choices=["raw", "zlib"], default="raw")
  p.add_argument("--event-layout", choices=["inline", "table"], default="table",
                 help="table (default): one shared float16 event_table.npy [distinct texts, D] + int32 ids per "
                      "record (the windows of overlapping pairs share most events); inline: float16 vectors "
                      "in every record (self-contained records, ~15x larger)")
  p.add_argument("--shard-compression", default="zstd:1",
                 help="ArrayRecord compression: uncompressed | zstd:LEVEL | brotli:LEVEL | snappy")
  p.add_argument("--records-per-shard", type=int, default=1024)
  p.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows per streamed CSV chunk")
  p.add_argument("--csv-engine", choices=["auto", "pandas", "pyarrow"], default="auto",
                 help="CSV parser for the streamed tables: pandas (default; flat memory) or pyarrow (~2.5x "
                      "faster, more memory); auto = $EHRXDIFF_CSV_ENGINE or pandas")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  p.add_argument("--cache-dir", default=None, help="embedding and image cache (default: OUT.cache)")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--vae-checkpoint", default=None,
                 help="store cached VAE latents (target_moments, prev_mean, prev_logvar) encoded by this VAE: a "
                      "VAE run, an EHRXDiff LDM run, or a Cheff / LDM autoencoder .pt/.ckpt/.safetensors")
  p.add_argument("--vae-config", default=None,
                 help="config file of that VAE's architecture (default: the run's config.json, else the "
                      "paper's configs/base.py); its data.image_size must equal --image-size")
  p.add_argument("--latents-batch", type=int, default=32, help="images per jitted VAE encode")


# ----------------------------------------------------------------------------- splits
def assign_splits(pairs: pd.DataFrame, split_file: str | None, fractions=(0.9, 0.05, 0.05), seed: int = 0) -> pd.Series:
  """Split name per pair; patient-disjoint (whole subjects go to one split)."""
  if split_file:
    norm = {"validate": "valid", "validation": "valid", "val": "valid"}
    if split_file.endswith(".json"):
      with open(split_file) as f:
        d = json.load(f)
      m = {int(s): norm.get(k, k) for k, subs in d.items() for s in subs}
      return pairs["subject_id"].astype(np.int64).map(m).fillna("unassigned")
    df = pd.read_csv(split_file, dtype=str)
    if "split" not in df:
      raise UserError(f"{split_file}: missing column 'split'")
    df["split"] = df["split"].map(lambda s: norm.get(s, s))
    if "dicom_id" in df:  # MIMIC-CXR's official split: by target image
      return pairs["trg_dicom"].map(dict(zip(df["dicom_id"], df["split"]))).fillna("unassigned")
    if "subject_id" not in df:
      raise UserError(f"{split_file}: missing column 'subject_id' (or 'dicom_id')")
    m = dict(zip(df["subject_id"].astype(np.int64), df["split"]))
    return pairs["subject_id"].astype(np.int64).map(m).fillna("unassigned")
  subjects = np.unique(pairs["subject_id"].to_numpy(np.int64))
  rng = np.random.default_rng(seed)
  perm = subjects[rng.permutation(len(subjects))]
  f = np.asarray(fractions, float) / np.sum(fractions)
  n_valid = int(round(f[1] * len(perm)))
  n_test = int(round(f[2] * len(perm)))
  m = {}
  for i, s in enumerate(perm):
    m[s] = "valid" if i < n_valid else "test" if i < n_valid + n_test else "train"
  return pairs["subject_id"].astype(np.int64).map(m)


# ----------------------------------------------------------------------------- labels
def imagenome_source(args) -> str:
  """The file the 'imagenome' labels come from (checked now, read after the cohort): the release's silver
  file (--chest-imagenome) or the per-image CSV (--imagenome-file)."""
  if args.chest_imagenome and args.imagenome_file:
    raise UserError("give one of --chest-imagenome and --imagenome-file, not both")
  if args.imagenome_file:
    if not os.path.isfile(args.imagenome_file):
      raise FileNotFoundError(f"missing input file: {args.imagenome_file} (--imagenome-file)")
    return args.imagenome_file
  if not args.chest_imagenome:
    raise FileNotFoundError("the 'imagenome' labels need the Chest ImaGenome 1.0.0 release: pass "
                            "--chest-imagenome DIR (or a per-image CSV with --imagenome-file), or drop "
                            "'imagenome' from --labels")
  imagenome_lib.release_file(args.chest_imagenome, schema.IMAGENOME_GOLD)
  return imagenome_lib.release_file(args.chest_imagenome, schema.IMAGENOME_SILVER)


def load_labels(pairs: pd.DataFrame, mimic_cxr: str, sets: list[str], imagenome: pd.DataFrame | None,
                counters: Counters) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """set -> (prev labels [N, L], target labels [N, L]) float32 with raw values (NaN unknown).
  `imagenome`: per-image labels (data_prep/imagenome.py) indexed by dicom_id."""
  out = {}
  for s in sets:
    if s == "chexpert":
      cols = ["subject_id", "study_id"] + list(schema.CHEXPERT_LABELS)
      df = read_table(mimic_cxr, CXR_CHEXPERT, cols, counters)
      vals = df[schema.CHEXPERT_LABELS].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
      idx = dict(zip(pd.to_numeric(df["study_id"], errors="coerce").fillna(-1).astype(np.int64), range(len(df))))
      keys = (("prev_study", "prev_dicom"), ("trg_study", "trg_dicom"))
    elif s == "imagenome":
      vals = imagenome[schema.IMAGENOME_LABELS].to_numpy(np.float32)
      idx = dict(zip(imagenome.index, range(len(imagenome))))
      keys = (("prev_dicom", "prev_dicom"), ("trg_dicom", "trg_dicom"))
    else:
      raise ValueError(f"unknown label set {s!r}: chexpert | imagenome")
    res, missing = [], set()
    for k, image in keys:
      rows = pairs[k].map(lambda v: idx.get(v if s == "imagenome" else int(v), -1)).to_numpy(np.int64)
      lab = np.full((len(pairs), vals.shape[1]), np.nan, np.float32)
      lab[rows >= 0] = vals[rows[rows >= 0]]
      missing.update(pairs[image][rows < 0])
      res.append(lab)
    counters[f"labels {s}: images"] += int(pd.concat([pairs["prev_dicom"], pairs["trg_dicom"]]).nunique())
    counters[f"labels {s}: images without labels"] += len(missing)
    out[s] = tuple(res)
  return out


# ----------------------------------------------------------------------------- tables
def table1(pairs: pd.DataFrame) -> pd.DataFrame:
  rows = []
  for split in list(SPLITS) + ["total"]:
    p = pairs if split == "total" else pairs[pairs["split"] == split]
    rows.append(dict(split=split, patients=p["subject_id"].nunique(), admissions=p["hadm_id"].nunique(),
                     samples=len(p), mean_interval_h=round(float(p["interval_h"].mean()), 2) if len(p) else float("nan")))
  return pd.DataFrame(rows)


def table5(pairs: pd.DataFrame) -> pd.DataFrame:
  rows = []
  for split in list(SPLITS) + ["total"]:
    p = pairs if split == "total" else pairs[pairs["split"] == split]
    n = p["n_events_total"]
    rows.append(dict(split=split, samples=len(p), mean=round(float(n.mean()), 1) if len(p) else float("nan"),
                     median=float(n.median()) if len(p) else float("nan"), min=int(n.min()) if len(p) else 0,
                     max=int(n.max()) if len(p) else 0,
                     truncated=int((p["n_events"] < n).sum())))
  return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- records
def demographics(r) -> dict:
  """`age` (float years at admission), `sex` ('F' | 'M', from patients.gender) and `race` (admissions.race)
  of a pair row; a value that is unknown is left out (readers treat a missing key as unknown)."""
  out = {}
  if pd.notna(r["age"]):
    out["age"] = float(r["age"])
  sex = str(r["gender"]).strip().upper() if pd.notna(r["gender"]) else ""
  if sex in ("F", "M"):
    out["sex"] = sex
  if pd.notna(r["race"]) and str(r["race"]).strip():
    out["race"] = str(r["race"])
  return out


def _sample_records(sub: pd.DataFrame, ids: list, vectors: np.ndarray, image_files: dict, labels: dict,
                    sel: np.ndarray, args, latents=None) -> "iter":
  """Serialized records of the pairs `sub`; `latents`: (moments, dicom -> row) of `latents_lib.cache_latents`."""
  from PIL import Image
  for j, (_, r) in zip(sel, sub.iterrows()):
    arrays = {}
    for name, dicom in (("prev_image", r["prev_dicom"]), ("target_image", r["trg_dicom"])):
      path = image_files[dicom]
      if args.image_codec == "png":
        with open(path, "rb") as f:
          arrays[name] = rec.Encoded(f.read(), "uint8", (args.image_size, args.image_size), "png")
      else:
        arrays[name] = np.asarray(Image.open(path).convert("L"), np.uint8)
    if args.event_layout == "inline":
      arrays["events"] = vectors[ids[j]]
    else:
      arrays["event_ids"] = ids[j].astype(np.int32)
    for s, (prev, trg) in labels.items():
      arrays[f"prev_labels_{s}"] = prev[j]
      arrays[f"target_labels_{s}"] = trg[j]
    if latents is not None:
      moments, row = latents
      arrays.update(latents_lib.record_arrays(moments, row[r["prev_dicom"]], row[r["trg_dicom"]]))
    meta = dict(key=r["key"], subject_id=int(r["subject_id"]), hadm_id=int(r["hadm_id"]),
                prev_dicom=r["prev_dicom"], trg_dicom=r["trg_dicom"], prev_study=int(r["prev_study"]),
                trg_study=int(r["trg_study"]), interval_h=float(r["interval_h"]), n_events_total=int(r["n_events_total"]),
                **demographics(r), **({"imagenome_gold": True} if r["imagenome_gold"] else {}))
    codecs = {"events": args.event_codec, "prev_image": args.image_codec, "target_image": args.image_codec}
    yield rec.encode_record(meta, arrays, codecs)


def _log(msg: str) -> None:
  print(f"[prepare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _print_counters(counters: Counters) -> None:
  print("Counters (dropped / malformed / attached):")
  for k, v in sorted(counters.items()):
    print(f"  {k}: {v}")
  sys.stdout.flush()


def _split_fractions(text: str) -> tuple[float, ...]:
  try:
    fractions = tuple(float(x) for x in text.split(","))
  except ValueError:
    fractions = ()
  if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
    raise UserError(f"--split-fractions {text!r}: expected three non-negative numbers TRAIN,VALID,TEST "
                    "with a positive sum, e.g. 0.9,0.05,0.05")
  return fractions


def run(args) -> int:
  t_start = time.time()
  filters = events_lib.load_filters(args.filters)
  window = args.window_hours if args.window_hours is not None else filters.get("window_hours", 48)
  min_age = args.min_age if args.min_age is not None else filters.get("min_age", 18)
  label_sets = [s.strip() for s in (args.labels or "").split(",") if s.strip()]
  fractions = _split_fractions(args.split_fractions)
  try:
    out = outputs.check_writable(args.out, args.overwrite)
  except FileExistsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  counters = Counters()
  cache_dir = args.cache_dir or out + ".cache"
  imagenome_file = imagenome_source(args) if "imagenome" in label_sets else None  # fails before the streaming
  # The VAE is loaded and checked first: a wrong checkpoint or image size fails before the long streaming.
  encoder = None
  if args.vae_checkpoint:
    try:
      encoder = latents_lib.VAEEncoder(args.vae_checkpoint, args.image_size, args.vae_config)
    except (ValueError, FileNotFoundError) as e:
      print(f"error: --vae-checkpoint: {e}", file=sys.stderr)
      return 2
    _log(f"VAE {encoder.info['source']} (step {encoder.info['step']}, {encoder.info['config']}): "
         f"latents {encoder.latent_shape}")

  # 1. cohort
  inputs = {}
  def small(root, name, cols):
    inputs[name] = fingerprint(find_file(root, name))
    return read_table(root, name, cols, counters)
  patients = small(args.mimic_iv, "hosp/patients", ["subject_id", "gender", "anchor_age", "anchor_year"])
  admissions = small(args.mimic_iv, "hosp/admissions", ["subject_id", "hadm_id", "admittime", "dischtime", "race"])
  meta = small(args.mimic_cxr, CXR_META, ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"])
  for spec in events_lib.table_specs(filters):
    inputs[spec.file] = fingerprint(find_file(args.mimic_iv, spec.file))
    if spec.dictionary and spec.dictionary not in inputs:
      inputs[spec.dictionary] = fingerprint(find_file(args.mimic_iv, spec.dictionary))
  adm = cohort_lib.admissions_with_age(patients, admissions, counters)
  imgs = cohort_lib.frontal_images(meta, tuple(filters.get("views", ("PA", "AP"))), counters)
  pairs = cohort_lib.build_pairs(adm, imgs, window_hours=window, min_age=min_age, counters=counters)
  counters["cohort: pairs"] = len(pairs)
  _log(f"cohort: {len(pairs)} pairs from {pairs['subject_id'].nunique()} patients")
  if not len(pairs):
    _print_counters(counters)
    raise UserError(f"the cohort is empty: no pair of frontal images within one adult admission in {args.mimic_iv} "
                    f"and {args.mimic_cxr} (the counters above say where the rows went)")

  # 2. events
  win = cohort_lib.windows(pairs)
  blocks = events_lib.stream_all(args.mimic_iv, filters, win, workers=args.workers, chunk_rows=args.chunk_rows,
                                 counters=counters, engine=args.csv_engine)
  ev, texts = events_lib.merge_blocks(blocks)
  ids, n_total = events_lib.assemble(pairs, ev, args.max_events)
  pairs["n_events_total"] = n_total
  pairs["n_events"] = [len(x) for x in ids]
  keep = n_total > 0
  counters["samples dropped: no event"] += int((~keep).sum())
  _log(f"events: {len(ev)} kept rows, {len(texts)} distinct texts; {int(keep.sum())} pairs with events")

  # 3. images
  need = pd.concat([pairs.loc[keep, ["subject_id", "prev_study", "prev_dicom"]].set_axis(["s", "st", "d"], axis=1),
                    pairs.loc[keep, ["subject_id", "trg_study", "trg_dicom"]].set_axis(["s", "st", "d"], axis=1)])
  need = need.drop_duplicates("d")
  img_cache = os.path.join(cache_dir, f"images-{args.image_size}-{args.resize}")
  image_files = images_lib.cache_images(need.itertuples(index=False, name=None), args.mimic_cxr, img_cache,
                                        args.image_size, args.resize, args.workers, counters)
  has_img = pairs["prev_dicom"].isin(image_files) & pairs["trg_dicom"].isin(image_files)
  counters["samples dropped: image file missing"] += int((keep & ~has_img).sum())
  keep &= has_img.to_numpy()
  pairs = pairs[keep].reset_index(drop=True)
  ids = [x for x, k in zip(ids, keep) if k]
  if not len(pairs):
    _print_counters(counters)
    raise UserError("no sample left after the event and image checks (the counters above say where the pairs went)")
  _log(f"images: {len(image_files)} cached; {len(pairs)} samples")

  # 4. splits + labels
  pairs["split"] = assign_splits(pairs, args.split_file, fractions, args.seed)
  imagenome, gold = None, set()
  if imagenome_file:
    inputs["imagenome"] = fingerprint(imagenome_file)
    t0 = time.time()
    if args.chest_imagenome:
      imagenome = imagenome_lib.read_release(args.chest_imagenome, counters, args.chunk_rows)
      gold = imagenome_lib.gold_subjects(args.chest_imagenome)
    else:
      imagenome = imagenome_lib.read_label_csv(imagenome_file)
    _log(f"Chest ImaGenome: labels of {len(imagenome)} images, {len(gold)} gold-set patients "
         f"in {time.time() - t0:.1f}s")
  # The reference leaves the gold-set patients out of its findings classifier's training split; their
  # records say so (meta imagenome_gold) and train/image_classifier.py ignores their labels in training.
  pairs["imagenome_gold"] = pairs["subject_id"].astype(np.int64).isin(gold)
  if gold:
    in_train = pairs["imagenome_gold"] & (pairs["split"] == "train")
    counters["labels imagenome: gold-set patients (no findings-classifier training)"] += int(
        pairs.loc[pairs["imagenome_gold"], "subject_id"].nunique())
    counters["labels imagenome: train samples of gold-set patients"] += int(in_train.sum())
  labels = load_labels(pairs, args.mimic_cxr, label_sets, imagenome, counters) if label_sets else {}

  # 5. embeddings of the texts still used
  used = np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int32)
  remap = np.full(len(texts), -1, np.int32)
  remap[used] = np.arange(len(used), dtype=np.int32)
  ids = [remap[x] for x in ids]
  embedder = embed_lib.make_embedder(args.embedder, args.event_dim)
  t0 = time.time()
  vectors = embed_lib.embed_texts([texts[i] for i in used], embedder, os.path.join(cache_dir, "embeddings"))
  _log(f"embeddings: {len(used)} distinct texts with {embedder.name} in {time.time() - t0:.1f}s")

  # 6. cached VAE latents of every image used (each distinct image encoded once)
  latents = None
  if encoder is not None:
    latents = latents_lib.cache_latents(encoder, image_files, pd.concat([pairs["prev_dicom"], pairs["trg_dicom"]]),
                                        os.path.join(cache_dir, "latents"), args.latents_batch, _log)

  # 7. write
  t1, t5 = table1(pairs), table5(pairs)
  print("Table 1 (this dataset):\n" + t1.to_string(index=False))
  print("Table 5 (events per sample, before truncation to max_events):\n" + t5.to_string(index=False))
  args.shard_compression = args.shard_compression.strip()
  options = f"group_size:1,{args.shard_compression}"
  splits_info = {}
  with outputs.atomic_directory(out, args.overwrite) as tmp:
    for split in sorted(pairs["split"].unique()):
      sel = np.flatnonzero((pairs["split"] == split).to_numpy())
      sub = pairs.iloc[sel]
      shards = write_lib.write_shards(tmp, split, _sample_records(sub, ids, vectors, image_files, labels, sel, args, latents),
                                      len(sel), args.records_per_shard, options)
      splits_info[split] = dict(samples=len(sel), shards=shards,
                                distinct_targets=int(sub["trg_dicom"].nunique()),
                                bytes=int(sum(s["bytes"] for s in shards)))
      idx = sub.assign(prev_time=sub["prev_time"].astype(str), trg_time=sub["trg_time"].astype(str),
                       admittime=sub["admittime"].astype(str), dischtime=sub["dischtime"].astype(str))
      idx = idx.drop(columns=["split"]).assign(record=np.arange(len(sel)))
      idx.to_json(os.path.join(tmp, rec.index_name(split)), orient="records", lines=True)
      _log(f"wrote {split}: {len(sel)} records, {splits_info[split]['bytes'] / max(len(sel), 1) / 1e3:.1f} kB/sample")
    if args.event_layout == "table":
      np.save(os.path.join(tmp, rec.EVENT_TABLE), vectors)
    write_lib.write_tfds_info(tmp, {s: [x["records"] for x in v["shards"]] for s, v in splits_info.items()})
    t1.to_csv(os.path.join(tmp, "table1.csv"), index=False)
    t5.to_csv(os.path.join(tmp, "table5.csv"), index=False)
    manifest = dict(
        schema_version=rec.SCHEMA_VERSION, dataset=rec.DATASET_NAME, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        image_size=args.image_size, event_dim=args.event_dim, max_events=args.max_events,
        event_layout=args.event_layout, label_sets=label_sets, splits=splits_info,
        counts=dict(samples=len(pairs), patients=int(pairs["subject_id"].nunique()),
                    admissions=int(pairs["hadm_id"].nunique()), distinct_event_texts=int(len(used))),
        options={k: v for k, v in vars(args).items() if k not in ("config_overrides",)},
        embedder=embedder.name, window_hours=window, min_age=min_age, inputs=inputs,
        counters=dict(sorted(counters.items())), table1=t1.to_dict(orient="records"),
        table5=t5.to_dict(orient="records"), seconds=round(time.time() - t_start, 1))
    if encoder is not None:
      manifest["latents"] = encoder.info
    write_lib.write_json(os.path.join(tmp, rec.MANIFEST), manifest)
  _print_counters(counters)
  _log(f"done: {out} ({len(pairs)} samples, {time.time() - t_start:.1f}s)")
  return 0


def main(argv=None) -> int:
  from ehrxdiff_jax import cli
  return cli.main(["prepare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  sys.exit(main())
