"""bistochastic: Sinkhorn projections, doubly-stochastic layers and their diagnostics.

``import bistochastic as bs``. Modules, one per concept:

* :mod:`bistochastic.sinkhorn` -- the entropic-OT / DSM solver (``sinkhorn``, ``project_dsm``)
* :mod:`bistochastic.birkhoff` -- the Birkhoff polytope: DSM checks, BvN decomposition, entropy
* :mod:`bistochastic.spectral` -- sigma_2, depth products, effective depth, frequency content
* :mod:`bistochastic.noise` -- SNR on the detail subspace, the finite-n bound, LayerNorm
* :mod:`bistochastic.models` -- the configurable DSM-mixing stack (and its Softmax variant)
* :mod:`bistochastic.fixed_point` -- Jacobian, spectral gap, resolvent, sensitivity of the fixed point
* :mod:`bistochastic.anneal` -- epsilon schedulers, EPH-ASC, the law-enforcing rule, k_safe oracle
* :mod:`bistochastic.tasks` -- the synthetic permutation-learning task
* :mod:`bistochastic.profiles` -- run profiles (``ci``, ``full``) and per-chapter sizes
* :mod:`bistochastic.book` -- chapter setup: device, seeds, reproducible random draws
* :mod:`bistochastic.plotting` -- the book's figure style
* :mod:`bistochastic.bench` -- side-by-side timing against POT and a plain eager loop
* :mod:`bistochastic.stats` -- effect sizes with intervals over seeds, equivalence tests (TOST)
* :mod:`bistochastic.explorer` -- precomputed data for the book's interactive explorer
* :mod:`bistochastic.nn` -- DSM layers as ``torch.nn`` modules (Sinkhorn attention, mHC hyper-connections, a small GPT) and training diagnostics
"""

from .sinkhorn import SinkhornResult, SinkhornWarning, marginal_error, project_dsm, sinkhorn
from . import profiles, book
from . import birkhoff, spectral, noise, models, fixed_point, anneal, tasks, bench, stats
from . import explorer, nn

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``bs.plotting`` needs matplotlib and seaborn (the ``[plot]`` extra): imported on first use, so
    # that ``import bistochastic`` works with the runtime dependencies alone.
    if name == "plotting":
        import importlib

        return importlib.import_module(".plotting", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SinkhornResult",
    "SinkhornWarning",
    "marginal_error",
    "project_dsm",
    "sinkhorn",
    "profiles",
    "book",
    "birkhoff",
    "spectral",
    "noise",
    "models",
    "fixed_point",
    "anneal",
    "tasks",
    "bench",
    "stats",
    "explorer",
    "nn",
]
