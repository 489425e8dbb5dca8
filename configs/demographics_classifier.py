"""The demographic image classifier of the paper's Table 6: the Chest ImaGenome classifier's ViT-S/16
(configs/image_classifier.py, same sizes and optimiser) with age / sex / race heads, trained on our records.

    ehrxdiff train --config configs/demographics_classifier.py --data DIR --workdir runs/democls
    ehrxdiff train --config configs/demographics_classifier.py:tiny --data DIR --workdir runs/democls   # demo
    ehrxdiff evaluate ... --demographics-classifier runs/democls

Labels: the admission's `age`, `sex`, `race` in each record's meta (evaluate/demographics.py groups race into
WHITE / BLACK / ASIAN / HISPANIC/LATINO / OTHER; unknown values are ignored). Both images of a sample are
examples. Loss: MSE on the standardised age ((age - age_mean) / age_std) + BCE on sex + softmax cross
entropy on race. Validation: age Pearson r, sex AUROC, race macro one-vs-rest AUROC.
The `evaluate` section is configs/image_classifier.py's.
"""
from configs import image_classifier

VARIANTS = image_classifier.VARIANTS


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown demographics_classifier variant {arg!r}; expected one of {VARIANTS}")
  c = image_classifier.get_config(arg)
  c.name = "demographics_classifier" + (f"_{arg}" if arg else "")
  # MIMIC-IV adult admissions: mean age about 65 years, standard deviation about 17
  c.model.imagenome_classifier.update(task="demographics", age_mean=65.0, age_std=17.0)
  c.data.labels = ""  # no finding labels needed: a dataset without Chest ImaGenome labels works too
  return c
