"""Doubly-stochastic matrices, the Birkhoff polytope and its barycentre.

A matrix ``M`` of shape ``(n, n)`` is *doubly stochastic* (a DSM) when ``M >= 0``, ``M 1 = 1`` and
``Mᵀ 1 = 1``. The set of DSMs is the Birkhoff polytope ``B_n``; by the Birkhoff–von Neumann theorem it
is the convex hull of the ``n!`` permutation matrices, and it has dimension ``(n-1)²``.

Conventions
-----------
A permutation is stored as an index array ``perm`` of shape ``(n,)`` (int64) and stands for the
permutation matrix ``P`` with ``P[i, perm[i]] = 1``; a stack of ``k`` permutations has shape ``(k, n)``.

Contents
--------
* :func:`is_doubly_stochastic`, :func:`check_doubly_stochastic` -- membership tests (batched).
* :func:`birkhoff_decomposition` -- greedy Birkhoff–von Neumann decomposition, with at most
  ``(n-1)² + 1`` terms (Marcus–Ree); :func:`reconstruct` inverts it.
* :func:`permutation_matrices`, :func:`all_permutations` -- permutations as matrices / all of them.
* :func:`uniform_barycenter` (``J = 11ᵀ/n``), :func:`entropy`, :func:`random_dsm`.
* :func:`birkhoff_dimension`, :func:`marcus_ree_bound`, :func:`face_dimension` -- combinatorial facts
  used to check a decomposition.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BirkhoffDecomposition",
    "is_doubly_stochastic",
    "check_doubly_stochastic",
    "birkhoff_decomposition",
    "reconstruct",
    "permutation_matrices",
    "all_permutations",
    "uniform_barycenter",
    "entropy",
    "random_dsm",
    "birkhoff_dimension",
    "marcus_ree_bound",
    "face_dimension",
]

Method = Literal["bottleneck", "hungarian"]


def _require_square(M, name: str) -> Tensor:
    if not isinstance(M, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape (..., n, n); got {type(M).__name__}")
    if M.dim() < 2 or M.shape[-1] != M.shape[-2] or M.shape[-1] == 0:
        raise ValueError(f"`{name}` must be square with n >= 1, shape (..., n, n); got {tuple(M.shape)}")
    if M.is_complex() or not M.is_floating_point():
        raise ValueError(f"`{name}` must have a real floating dtype; got {M.dtype}")
    return M


def _check_n(n, name: str = "n") -> int:
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {n!r}")
    return int(n)


# ----------------------------------------------------------------------------------------------
# membership


def _dsm_violation(M: Tensor) -> Tensor:
    """Largest violation of ``M >= 0``, ``M1 = 1``, ``Mᵀ1 = 1`` (entrywise), shape ``(...)``."""
    neg = (-M).clamp_min(0).amax(dim=(-2, -1))
    rows = (M.sum(-1) - 1).abs().amax(-1)
    cols = (M.sum(-2) - 1).abs().amax(-1)
    bad = ~torch.isfinite(M).all(dim=-1).all(dim=-1)
    v = torch.maximum(neg, torch.maximum(rows, cols))
    return torch.where(bad, torch.full_like(v, float("inf")), v)


def is_doubly_stochastic(M: Tensor, atol: float = 1e-8) -> Tensor:
    """Whether ``M`` is doubly stochastic up to ``atol``, batched.

    Parameters
    ----------
    M : Tensor ``(..., n, n)``
        Real square matrices.
    atol : float
        Absolute tolerance on every entry's negativity and on every row and column sum's distance
        from one.

    Returns
    -------
    Tensor ``(...)`` of bool
        ``min M >= -atol`` and ``max |M1 - 1|, max |Mᵀ1 - 1| <= atol`` (non-finite entries: False).

    Raises
    ------
    ValueError
        If ``M`` is not a real square tensor or ``atol`` is negative.
    """
    _require_square(M, "M")
    if not (atol >= 0 and math.isfinite(atol)):
        raise ValueError(f"`atol` must be a nonnegative finite number; got {atol!r}")
    return _dsm_violation(M) <= atol


def check_doubly_stochastic(M: Tensor, name: str = "M", atol: float = 1e-8) -> None:
    """Raise ``ValueError`` naming ``name`` unless every matrix of ``M (..., n, n)`` is a DSM up to ``atol``."""
    _require_square(M, name)
    v = _dsm_violation(M)
    if not bool((v <= atol).all()):
        raise ValueError(
            f"`{name}` must be doubly stochastic (nonnegative, unit row and column sums) up to "
            f"atol={atol:g}; largest violation {float(v.max()):.3e}"
        )


# ----------------------------------------------------------------------------------------------
# permutations


def permutation_matrices(perms: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Permutation matrices from index arrays: ``P[..., i, perms[..., i]] = 1``.

    Parameters
    ----------
    perms : Tensor ``(..., n)`` of integers
        Each row a permutation of ``0..n-1``.
    dtype : torch.dtype
        Dtype of the result (device follows ``perms``).

    Returns
    -------
    Tensor ``(..., n, n)``
    """
    if not isinstance(perms, Tensor) or perms.dim() < 1 or perms.is_floating_point() or perms.is_complex():
        raise ValueError("`perms` must be an integer tensor of shape (..., n)")
    n = perms.shape[-1]
    srt = torch.sort(perms, dim=-1).values
    if n == 0 or not bool((srt == torch.arange(n, device=perms.device)).all()):
        raise ValueError("`perms` must hold permutations of 0..n-1 along its last dimension")
    return torch.nn.functional.one_hot(perms.long(), n).to(dtype)


def all_permutations(n: int, device: Union[str, torch.device, None] = None) -> Tensor:
    """All ``n!`` permutations of ``0..n-1`` in lexicographic order, shape ``(n!, n)`` int64.

    Only for tiny ``n`` (``1 <= n <= 8``; ``8! = 40320``).
    """
    n = _check_n(n)
    if n > 8:
        raise ValueError(f"`n` must be <= 8 for all_permutations (n! rows); got {n}")
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long, device=device).reshape(-1, n)


def uniform_barycenter(n: int, dtype: torch.dtype = torch.float64,
                       device: Union[str, torch.device, None] = None) -> Tensor:
    """The barycentre ``J = 11ᵀ/n`` of the Birkhoff polytope, shape ``(n, n)``."""
    n = _check_n(n)
    return torch.full((n, n), 1.0 / n, dtype=dtype, device=device)


def entropy(M: Tensor) -> Tensor:
    """Shannon entropy ``H(M) = -Σ_ij M_ij log M_ij`` (with ``0 log 0 = 0``), batched.

    Parameters
    ----------
    M : Tensor ``(..., n, m)``, nonnegative.

    Returns
    -------
    Tensor ``(...)``. For a DSM, ``H(M) <= n log n`` with equality only at ``J``.
    """
    if not isinstance(M, Tensor) or M.dim() < 2 or not M.is_floating_point():
        raise ValueError("`M` must be a real floating tensor of shape (..., n, m)")
    if bool((M < 0).any()):
        raise ValueError("`M` must be nonnegative")
    return -torch.special.xlogy(M, M).sum(dim=(-2, -1))


def birkhoff_dimension(n: int) -> int:
    """Dimension ``(n-1)²`` of the Birkhoff polytope ``B_n``."""
    n = _check_n(n)
    return (n - 1) ** 2


def marcus_ree_bound(n: int) -> int:
    """``(n-1)² + 1``: every ``n × n`` DSM is a convex combination of at most this many permutations."""
    return birkhoff_dimension(n) + 1


def face_dimension(M: Tensor, zero_tol: float = 0.0) -> int:
    """Dimension of the smallest face of ``B_n`` containing the DSM ``M``.

    That face is ``{X in B_n : supp X ⊆ supp M}``. The support of a DSM is a bipartite graph ``G``
    (rows and columns as vertices, ``M_ij > zero_tol`` as edges) in which every edge lies on a perfect
    matching, and then the face has dimension ``|E| - 2n + c`` with ``c`` the number of connected
    components of ``G`` (Brualdi & Gibson, 1977). A greedy decomposition of ``M`` has at most
    ``face_dimension(M) + 1`` terms.

    Parameters
    ----------
    M : Tensor ``(n, n)``, doubly stochastic.
    zero_tol : float
        Entries ``<= zero_tol`` count as zero.
    """
    _require_square(M, "M")
    if M.dim() != 2:
        raise ValueError(f"`M` must be a single matrix (n, n); got {tuple(M.shape)}")
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    A = M.detach().cpu().numpy() > zero_tol
    n = A.shape[0]
    r, c = np.nonzero(A)
    g = coo_matrix((np.ones(len(r)), (r, n + c)), shape=(2 * n, 2 * n))
    ncomp, _ = connected_components(g, directed=False)
    return int(len(r) - 2 * n + ncomp)


# ----------------------------------------------------------------------------------------------
# Birkhoff–von Neumann decomposition


@dataclass
class BirkhoffDecomposition:
    """A convex combination ``M ≈ Σ_k weights[k] · P(perms[k])``.

    Attributes
    ----------
    weights : Tensor ``(k,)``
        Positive, summing to one; in the order found (the greedy step index).
    perms : Tensor ``(k, n)`` int64
        ``perms[k, i]`` is the column of the one in row ``i`` of the ``k``-th permutation matrix.
    residual : float
        ``max_ij |M - Σ_k weights[k] P_k|`` for the returned (normalised) weights.
    mass : float
        ``Σ_k θ_k`` before normalisation (1 up to the tolerance for an exact DSM).
    method : str
        How each permutation was chosen.
    """

    weights: Tensor
    perms: Tensor
    residual: float
    mass: float
    method: str

    @property
    def n_terms(self) -> int:
        return int(self.weights.shape[0])

    @property
    def matrices(self) -> Tensor:
        """The permutation matrices, shape ``(k, n, n)``, dtype and device of ``weights``."""
        return permutation_matrices(self.perms, dtype=self.weights.dtype).to(self.weights.device)

    def __repr__(self) -> str:
        return (f"BirkhoffDecomposition(n_terms={self.n_terms}, n={int(self.perms.shape[-1])}, "
                f"residual={self.residual:.1e}, method={self.method!r})")


def _perfect_matching(mask: np.ndarray) -> Optional[np.ndarray]:
    """A perfect matching of the bipartite graph ``mask (n, n)`` as ``perm (n,)``, or None."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    match = maximum_bipartite_matching(csr_matrix(mask.astype(np.int8)), perm_type="column")
    if (match < 0).any():
        return None
    return match.astype(np.int64)


def _bottleneck_permutation(R: np.ndarray, zero_tol: float) -> Optional[np.ndarray]:
    """The permutation inside ``{R > zero_tol}`` that maximises its smallest entry (bisection on thresholds)."""
    vals = np.unique(R[R > zero_tol])
    if vals.size == 0:
        return None
    best = _perfect_matching(R >= vals[0])
    if best is None:
        return None
    lo, hi = 0, vals.size - 1  # invariant: a matching exists at vals[lo]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        m = _perfect_matching(R >= vals[mid])
        if m is None:
            hi = mid - 1
        else:
            lo, best = mid, m
    return best


def _hungarian_permutation(R: np.ndarray, zero_tol: float) -> Optional[np.ndarray]:
    """The permutation inside ``{R > zero_tol}`` maximising ``Σ_i log R[i, perm[i]]`` (linear_sum_assignment)."""
    from scipy.optimize import linear_sum_assignment

    pos = R > zero_tol
    if not pos.any():
        return None
    logs = np.log(np.where(pos, R, 1.0))
    big = (np.abs(logs[pos]).max() + 1.0) * (R.shape[0] + 1)  # forbids zeros: one costs more than any full path
    cost = np.where(pos, -logs, big)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(R.shape[0], dtype=np.int64)
    perm[rows] = cols
    if not pos[np.arange(R.shape[0]), perm].all():
        return None
    return perm


def birkhoff_decomposition(M: Tensor, tol: float = 1e-10, *, method: Method = "bottleneck",
                           atol: float = 1e-8, max_terms: Optional[int] = None) -> BirkhoffDecomposition:
    """Greedy Birkhoff–von Neumann decomposition of a doubly-stochastic matrix.

    Starting from the remainder ``R = M``, repeat: find a permutation ``σ`` inside the support of ``R``
    (one exists by Hall's theorem, because ``R / R.sum(1)[0]`` is doubly stochastic), take
    ``θ = min_i R[i, σ(i)]``, subtract ``θ P_σ`` and set the entry attaining the minimum to exactly
    zero; stop when ``max R <= tol`` (or, when rounding has left a remainder with no permutation in
    its support, when ``max R <= atol``). Each step removes at least one entry from the support, so the
    scaled remainder moves to a proper face of ``B_n`` and the number of terms is at most
    ``face_dimension(M) + 1 <= (n-1)² + 1`` (Marcus–Ree). The weights ``θ_k`` are normalised to sum to
    one (their raw sum is returned as ``mass``).

    Parameters
    ----------
    M : Tensor ``(n, n)``
        A doubly-stochastic matrix (up to ``atol``); computed in float64 on the CPU.
    tol : float
        Entries of the remainder ``<= tol`` count as zero; the loop stops when all are.
    method : {"bottleneck", "hungarian"}
        ``"bottleneck"``: the permutation maximising its smallest entry (largest step ``θ``; bisection
        over thresholds with Hopcroft–Karp matchings). ``"hungarian"``: the permutation maximising
        ``Σ log R[i, σ(i)]`` (``scipy.optimize.linear_sum_assignment`` on the cost ``-log R``, zero
        entries forbidden).
    atol : float
        Tolerance of the doubly-stochastic check of ``M``.
    max_terms : int, optional
        Safety cap on the number of steps (default ``n²``).

    Returns
    -------
    BirkhoffDecomposition
        ``weights (k,)`` (dtype and device of ``M``), ``perms (k, n)``, ``residual``, ``mass``.

    Raises
    ------
    ValueError
        If ``M`` is not a single doubly-stochastic matrix, or for a bad ``tol``/``method``.
    RuntimeError
        If the remainder has no permutation in its support before it vanishes (numerically
        inconsistent input).
    """
    _require_square(M, "M")
    if M.dim() != 2:
        raise ValueError(f"`M` must be a single matrix of shape (n, n); got {tuple(M.shape)}")
    if method not in ("bottleneck", "hungarian"):
        raise ValueError(f"`method` must be 'bottleneck' or 'hungarian'; got {method!r}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"`tol` must be a positive finite number; got {tol!r}")
    check_doubly_stochastic(M, "M", atol=atol)
    n = M.shape[-1]
    cap = n * n if max_terms is None else int(max_terms)
    find = _bottleneck_permutation if method == "bottleneck" else _hungarian_permutation

    M64 = M.detach().to("cpu", torch.float64).numpy()
    R = M64.copy()
    R[R <= tol] = 0.0
    rows = np.arange(n)
    thetas, perms = [], []
    while R.max() > tol:
        if len(thetas) >= cap:
            raise RuntimeError(f"birkhoff_decomposition exceeded max_terms={cap}")
        perm = find(R, tol)
        if perm is None:
            if R.max() <= atol:  # leftover rounding, within the precision `M` was accepted at
                break
            raise RuntimeError(
                f"the remainder (max entry {R.max():.3e}) has no permutation in its support after "
                f"{len(thetas)} terms; `M` is not doubly stochastic to the precision `tol`={tol:g}")
        vals = R[rows, perm]
        i_min = int(np.argmin(vals))
        theta = float(vals[i_min])
        R[rows, perm] -= theta
        R[i_min, perm[i_min]] = 0.0
        R[R <= tol] = 0.0
        thetas.append(theta)
        perms.append(perm)
    if not thetas:
        raise RuntimeError("`M` has no entry above `tol`")
    th = np.asarray(thetas)
    mass = float(th.sum())
    w = th / mass
    P = np.zeros((len(perms), n, n))
    P[np.arange(len(perms))[:, None], rows[None, :], np.stack(perms)] = 1.0
    residual = float(np.abs(np.einsum("k,kij->ij", w, P) - M64).max())
    return BirkhoffDecomposition(
        weights=torch.as_tensor(w, dtype=M.dtype, device=M.device),
        perms=torch.as_tensor(np.stack(perms), dtype=torch.long, device=M.device),
        residual=residual, mass=mass, method=method,
    )


def reconstruct(weights: Tensor, perms: Tensor) -> Tensor:
    """``Σ_k weights[..., k] P(perms[..., k, :])``, shape ``(..., n, n)``.

    Parameters
    ----------
    weights : Tensor ``(..., k)``
    perms : Tensor ``(..., k, n)`` integer (batch dims broadcast with ``weights``).
    """
    if not isinstance(weights, Tensor) or weights.dim() < 1 or not weights.is_floating_point():
        raise ValueError("`weights` must be a real floating tensor of shape (..., k)")
    if not isinstance(perms, Tensor) or perms.dim() < 2:
        raise ValueError("`perms` must be an integer tensor of shape (..., k, n)")
    if perms.shape[-2] != weights.shape[-1]:
        raise ValueError(f"`perms` has {perms.shape[-2]} permutations but `weights` has {weights.shape[-1]}")
    P = permutation_matrices(perms, dtype=weights.dtype).to(weights.device)
    return (weights[..., :, None, None] * P).sum(-3)


# ----------------------------------------------------------------------------------------------
# random DSMs


def random_dsm(n: int, generator: Optional[torch.Generator] = None, *, method: str = "sinkhorn",
               tau: float = 1.0, k: Optional[int] = None, batch: Sequence[int] = (),
               dtype: torch.dtype = torch.float64, device: Union[str, torch.device, None] = None,
               tol: float = 1e-12, max_iter: int = 20000) -> Tensor:
    """Random doubly-stochastic matrices, shape ``(*batch, n, n)``.

    Random numbers are drawn on the CPU from ``generator`` (reproducible across devices), then moved.

    Parameters
    ----------
    n : int
        Size.
    generator : torch.Generator, optional
        CPU generator.
    method : {"sinkhorn", "convex"}
        ``"sinkhorn"``: ``bs.project_dsm(S, tau)`` of standard Gaussian logits ``S`` (entrywise
        positive, converged to ``tol``; a draw that the default solver leaves short of ``tol`` in
        ``max_iter`` iterations is finished with Anderson acceleration). ``"convex"``: ``Σ_{l<k} w_l P_l`` with ``k`` uniform random
        permutations and Dirichlet(1, ..., 1) weights (sparse support when ``k < n``).
    tau : float
        Temperature for ``"sinkhorn"``.
    k : int, optional
        Number of permutations for ``"convex"`` (default ``n``).
    batch : sequence of int
        Leading batch shape.
    tol, max_iter
        Passed to the Sinkhorn solver.
    """
    n = _check_n(n)
    batch = tuple(int(b) for b in batch)
    if any(b < 0 for b in batch):
        raise ValueError(f"`batch` must hold nonnegative sizes; got {batch}")
    if method == "sinkhorn":
        from .sinkhorn import project_dsm

        S = torch.randn(*batch, n, n, generator=generator, dtype=torch.float64)
        res = project_dsm(S, tau=tau, tol=tol, max_iter=max_iter, warn=False)
        if not res.all_converged:
            # a draw close to a permutation (logit gaps of many tau) contracts by 1 - O(e^-gap/tau)
            # per plain or over-relaxed iteration; Anderson acceleration finishes it from there
            # in a few iterations (reported as usual if it cannot)
            res = project_dsm(S, tau=tau, tol=tol, max_iter=max_iter, momentum="anderson",
                              init=(res.f, res.g))
        M = res.plan
    elif method == "convex":
        k = n if k is None else _check_n(k, "k")
        keys = torch.rand(*batch, k, n, generator=generator, dtype=torch.float64)
        perms = keys.argsort(dim=-1)
        e = -torch.log1p(-torch.rand(*batch, k, generator=generator, dtype=torch.float64))
        M = reconstruct(e / e.sum(-1, keepdim=True), perms)
    else:
        raise ValueError(f"`method` must be 'sinkhorn' or 'convex'; got {method!r}")
    return M.to(device=device if device is not None else M.device, dtype=dtype)
