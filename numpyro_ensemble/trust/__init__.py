"""Trusting a fit: importance and stacking weights, convergence checks, and the
summaries with their verdicts."""
