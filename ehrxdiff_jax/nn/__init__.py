"""Flax Linen networks of EHRXDiff. NHWC images, float32 parameters, configurable compute dtype,
logical axis names on every parameter (see layers.py)."""
