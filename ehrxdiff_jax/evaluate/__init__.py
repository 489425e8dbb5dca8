"""Evaluation: the paper's metrics (metrics.py), its classifier networks (densenet.py: torchxrayvision
DenseNet-121 for FID features and CheXpert outputs; vit_classifier.py: the Chest ImaGenome ViT-S/16 and the
demographic classifier on the same backbone), the demographic labels and race grouping (demographics.py) and
the report (report.py: Tables 2 / 3 / 6, FID, SSIM / PSNR / LPIPS -> report.md, metrics.json, figure.png).

Submodules are imported on use (`from ehrxdiff_jax.evaluate import metrics`); metrics and report need
only numpy / scipy / Pillow, the networks need jax / flax.
"""
