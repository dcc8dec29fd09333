"""Ensembles of SVI and MAP fits of one NumPyro model."""

from numpyro_ensemble.engine.cache import clear_compiled_programs, enable_compilation_cache
from numpyro_ensemble.engine.checkpoint import load_checkpoint, save_checkpoint
from numpyro_ensemble.engine.members import per_member
from numpyro_ensemble.engine.starts import IdenticalMembersWarning
from numpyro_ensemble.engine.stopping import EarlyStopping
from numpyro_ensemble.fit.elbo import TemperedTrace_ELBO
from numpyro_ensemble.fit.map import EnsembleMAP
from numpyro_ensemble.fit.oneshot import ensemble_map, ensemble_svi
from numpyro_ensemble.fit.svi import EnsembleSVI
from numpyro_ensemble.trust.diagnostics import EnsembleSummary, ensemble_summary
from numpyro_ensemble.trust.importance import importance_weights
from numpyro_ensemble.trust.nuts_summary import NUTSSummary, nuts_summary
from numpyro_ensemble.trust.stacking import stacking_weights
from numpyro_ensemble.use.arviz_export import to_arviz
from numpyro_ensemble.use.fitted import laplace_exclusions, laplace_prior_precision
from numpyro_ensemble.use.laplace import laplace_members
from numpyro_ensemble.use.laplace_guides import AutoLowRankPrecisionNormal, LowRankPrecisionNormal
from numpyro_ensemble.use.laplace_starts import laplace_init_params
from numpyro_ensemble.use.linearized import linearized_predictive
from numpyro_ensemble.use.mcmc import mcmc_init_params
from numpyro_ensemble.use.nuts_run import WarmNUTSRun
from numpyro_ensemble.use.posterior import ensemble_predict, ensemble_predictive, sample_posterior
from numpyro_ensemble.use.selection import concat_members, select_members, take_member
from numpyro_ensemble.use.warmstart import NUTSWarmStart, nuts_warm_start
from numpyro_ensemble.use.weights import ImportanceWeights, StackingWeights

__all__ = [
    "AutoLowRankPrecisionNormal",
    "EarlyStopping",
    "EnsembleMAP",
    "EnsembleSVI",
    "EnsembleSummary",
    "IdenticalMembersWarning",
    "ImportanceWeights",
    "NUTSSummary",
    "NUTSWarmStart",
    "LowRankPrecisionNormal",
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
    "laplace_exclusions",
    "laplace_init_params",
    "laplace_members",
    "laplace_prior_precision",
    "linearized_predictive",
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
