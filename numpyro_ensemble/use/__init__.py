"""Using a fit: draws and predictive, ArviZ export, member selection, Laplace
members and their linearized predictive, the weight containers, MCMC starts and the
NUTS warm start."""
