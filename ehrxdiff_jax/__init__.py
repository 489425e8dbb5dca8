"""EHRXDiff in JAX/Flax: latent diffusion that predicts the next chest X-ray from the previous one and
the EHR events recorded in between."""
__version__ = "0.1.0"
