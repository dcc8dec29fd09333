"""Ensembles of SVI and MAP fits of one NumPyro model."""

from numpyro_ensemble.arviz_export import to_arviz
from numpyro_ensemble.cache import clear_compiled_programs, enable_compilation_cache
from numpyro_ensemble.checkpoint import load_checkpoint, save_checkpoint
from numpyro_ensemble.diagnostics import EnsembleSummary, ensemble_summary
from numpyro_ensemble.elbo import TemperedTrace_ELBO
from numpyro_ensemble.importance import importance_weights
from numpyro_ensemble.laplace import laplace_members
from numpyro_ensemble.laplace_starts import laplace_init_params
from numpyro_ensemble.map import EnsembleMAP
from numpyro_ensemble.mcmc import mcmc_init_params
from numpyro_ensemble.members import per_member
from numpyro_ensemble.nuts_run import WarmNUTSRun
from numpyro_ensemble.nuts_summary import NUTSSummary, nuts_summary
from numpyro_ensemble.oneshot import ensemble_map, ensemble_svi
from numpyro_ensemble.posterior import ensemble_predict, ensemble_predictive, sample_posterior
from numpyro_ensemble.selection import concat_members, select_members, take_member
from numpyro_ensemble.stacking import stacking_weights
from numpyro_ensemble.starts import IdenticalMembersWarning
from numpyro_ensemble.stopping import EarlyStopping
from numpyro_ensemble.svi import EnsembleSVI
from numpyro_ensemble.warmstart import NUTSWarmStart, nuts_warm_start
from numpyro_ensemble.weights import ImportanceWeights, StackingWeights

__all__ = [
    "EarlyStopping",
    "EnsembleMAP",
    "EnsembleSVI",
    "EnsembleSummary",
    "IdenticalMembersWarning",
    "ImportanceWeights",
    "NUTSSummary",
    "NUTSWarmStart",
    "StackingWeights",
    "TemperedTrace_ELBO",
    "WarmNUTSRun",
    "concat_members",
    "clear_compiled_programs",
    "enable_compilation_cache",
    "ensemble_summary",
    "ensemble_map",
    "ensemble_predict",
    "ensemble_predictive",
    "ensemble_svi",
    "importance_weights",
    "laplace_init_params",
    "laplace_members",
    "load_checkpoint",
    "mcmc_init_params",
    "nuts_summary",
    "nuts_warm_start",
    "per_member",
    "sample_posterior",
    "save_checkpoint",
    "select_members",
    "stacking_weights",
    "take_member",
    "to_arviz",
]

__version__ = "0.1.0"
