"""Ensembles of SVI and MAP fits of one NumPyro model."""

from numpyro_ensemble.arviz_export import to_arviz
from numpyro_ensemble.cache import enable_compilation_cache
from numpyro_ensemble.elbo import TemperedTrace_ELBO
from numpyro_ensemble.map import EnsembleMAP
from numpyro_ensemble.mcmc import mcmc_init_params
from numpyro_ensemble.members import IdenticalMembersWarning, per_member
from numpyro_ensemble.oneshot import ensemble_map, ensemble_svi
from numpyro_ensemble.posterior import ensemble_predict, ensemble_predictive, sample_posterior
from numpyro_ensemble.svi import EnsembleSVI

__all__ = [
    "EnsembleMAP",
    "EnsembleSVI",
    "IdenticalMembersWarning",
    "TemperedTrace_ELBO",
    "enable_compilation_cache",
    "ensemble_map",
    "ensemble_predict",
    "ensemble_predictive",
    "ensemble_svi",
    "mcmc_init_params",
    "per_member",
    "sample_posterior",
    "to_arviz",
]

__version__ = "0.1.0"
