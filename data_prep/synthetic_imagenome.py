"""The synthetic database's Chest ImaGenome 1.0.0 release: the attribute-relations files the reader
(`data_prep.imagenome`) reads, written from each image's 10 finding labels (`synthetic.imagenome_labels`).

Each finding of each image is mentioned in the report, so every label is known, in the ways the real
files mix: one or two anatomical boxes per finding, several sentences, an earlier mention contradicted by
the last one (the last mention wins), a present finding denied in another box (present in any box wins),
`nlp` rows that contradict the label (the rule drops them), sentence positions past 9 (sorted as
numbers) and image ids with and without the `.dcm` suffix. The gold set repeats the rows of the first study
of a few patients under `patient_id`. Randomness comes from its own generator, so the rest of the database
does not depend on this file.
"""
from __future__ import annotations

import csv
import os

import numpy as np

from data_prep import schema

# attribute (release spelling) -> (categoryID, anatomical boxes it is reported in)
_BOXES = {
  'pleural effusion': ('anatomicalfinding', ('right costophrenic angle', 'left costophrenic angle')),
  'enlarged cardiac silhouette': ('anatomicalfinding', ('cardiac silhouette',)),
  'lung opacity': ('anatomicalfinding', ('right lower lung zone', 'left lower lung zone', 'right lung', 'left lung')),
  'pulmonary edema/hazy opacity': ('anatomicalfinding', ('right lung', 'left lung')),
  'pneumonia': ('disease', ('right lower lung zone', 'left lower lung zone')),
  'consolidation': ('anatomicalfinding', ('right lower lung zone', 'left lower lung zone')),
  'vascular congestion': ('anatomicalfinding', ('right hilar structures', 'left hilar structures')),
  'pneumothorax': ('anatomicalfinding', ('right apical zone', 'left apical zone')),
  'enlarged hilum': ('anatomicalfinding', ('right hilar structures', 'left hilar structures')),
  'mediastinal widening': ('anatomicalfinding', ('mediastinum', 'upper mediastinum')),
}


def _finding_rows(rng, study_id: int, dicom: str, name: str, present: bool) -> list[dict]:
  """Mentions of one finding whose image-level label under the reference's rule is `present`."""
  category, boxes = _BOXES[name]
  chosen = list(rng.choice(len(boxes), min(len(boxes), int(rng.integers(1, 3))), replace=False))
  sentences = sorted(rng.choice(np.arange(1, 14), 2, replace=False).tolist())
  rows = []

  def mention(box, sent, relation, cat=category):
    image = dicom + ('.dcm' if rng.random() < 0.3 else '')
    text = f"{'There is' if relation else 'No'} {name} in the {box}."
    rows.append(dict(study_id=study_id, image_id=image, row_id=f'{study_id}|{sent}', bbox=box,
                     relation=int(relation), label_name=name, categoryID=cat, sentence=text))

  for k, b in enumerate(chosen):
    final = present and k == 0                      # a present finding: its first box; others deny it
    if rng.random() < 0.3:                           # an earlier mention the last one overrides
      mention(boxes[b], sentences[0], not final)
    mention(boxes[b], sentences[1], final)
  if rng.random() < 0.2:                             # an nlp row against the label: dropped by the rule
    mention(boxes[chosen[0]], sentences[1] + 1, not present, 'nlp')
  return rows


def _write_tsv(path: str, columns, rows) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', newline='') as f:
    w = csv.writer(f, delimiter='\t', lineterminator='\n')
    w.writerow(columns)
    for r in rows:
      w.writerow([r[c] for c in columns])


def write_release(root: str, images: list[dict], seed: int) -> dict:
  """Writes ROOT/silver_dataset/... and ROOT/gold_dataset/... from `images` (dicts with dicom_id,
  study_id, subject_id and the 0/1 columns of schema.IMAGENOME_LABELS); returns row counts."""
  rng = np.random.default_rng([seed, 0x1A6E])
  names = {col: name for name, col in schema.IMAGENOME_ATTRIBUTES.items()}
  silver, rows_of_study = [], {}
  for im in images:
    for col in schema.IMAGENOME_LABELS:
      rows = _finding_rows(rng, int(im['study_id']), im['dicom_id'], names[col], bool(im[col]))
      silver.extend(rows)
      rows_of_study.setdefault((im['subject_id'], im['study_id']), []).extend(rows)
  first_study = {}
  for subject, study in rows_of_study:
    first_study.setdefault(subject, study)
  subjects = sorted(first_study)
  gold_subjects = rng.choice(subjects, max(1, len(subjects) // 10), replace=False) if subjects else []
  gold = [dict(r, patient_id=int(s)) for s in sorted(gold_subjects) for r in rows_of_study[(s, first_study[s])]]
  _write_tsv(os.path.join(root, *schema.IMAGENOME_SILVER.split('/')), schema.IMAGENOME_SILVER_COLUMNS, silver)
  _write_tsv(os.path.join(root, *schema.IMAGENOME_GOLD.split('/')), schema.IMAGENOME_GOLD_COLUMNS, gold)
  return dict(imagenome_silver_rows=len(silver), imagenome_gold_patients=len(gold_subjects))
