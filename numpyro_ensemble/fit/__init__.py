"""The fitting API on the engine: EnsembleSVI, EnsembleMAP, TemperedTrace_ELBO,
per-member linesearch optimizers and the one-shot helpers."""
