"""TransCLIP (Zanella, Gérin & Ben Ayed, "Boosting Vision-Language Models with Transduction", NeurIPS 2024,
arXiv 2406.01837): a KL-regularised transductive EM over the whole unlabelled test set, on frozen image
features, with the text classifier's (or another method's) predictions as the prior.

    per class c: a Gaussian N(mu_c, diag(var)) with one variance shared by all classes
    z_i  proportional to  y_hat_ic^lambda * exp((log N(x_i; mu_c, var) + T/(2k) sum_j W_ij (z_j + z_j')) / T)
    mu, var: the z-weighted (and, few-shot, gamma-weighted shot) means and variance

with W the k-nearest-neighbour graph of the test features (cosine values), T = 50 and y_hat the prior.

Defaults follow the official code (github.com/MaxZanella/transduction-for-vlms, commit 6a9e8f3; paths below
are in that repository):
- TransCLIP_solver/TransCLIP.py:53 10 EM iterations (z is updated once more after the 10th mu/var update,
  :93-114); :54 initial variance 1/d; :55 3 neighbours; :91 the few-shot variant loops over the gammas,
  warm-starting each from the previous one's state, and keeps the z of the best validation accuracy (:102-109,
  the validation sample's prediction is that of its nearest test sample, TransCLIP_utils.py:279);
- TransCLIP_utils.py:6-25 the z update: 5 inner iterations, Laplacian weight 50/(2k), temperature 1/50,
  prior y_hat^lambda; :28-58 mu (normalised z-weighted mean; few-shot + gamma 50/|S| x the shots);
  :61-119 the shared diagonal variance; :132-161 mu initialised from the 8 most confident test samples of each
  class (zero-shot), or from the sum of the shots (few-shot); :170-186 lambda 1 zero-shot, 0.5 and gammas
  [0.002, 0.01, 0.02, 0.2] few-shot; :234-254 W: the k nearest neighbours of each test feature (its top-1,
  itself, dropped), values the cosine similarities; :281 the prior is softmax(100 x f @ t) of the text
  classifier (`clip_classifier` with the dataset's single template, utils.py:17-70, datasets/*.py);
- main.py:89-97 zero-shot TransCLIP (`--shots 0`, scripts/transclip_zs.sh) and TransCLIP-FS (the shots join
  the EM, scripts/transclip_fs.sh); on top of a few-shot method, main.py:99-115 with its text prototypes or its
  softmaxed predictions as the prior (TransCLIP_solver/bench_utils.py) and the zero-shot solver
  (scripts/fewshot_atop.sh passes no `--shots`): that is `METHOD+transclip` (`fsbench.transduction`).

Deviations (docs/methods.md): the number of classes is the class set's, not the number of distinct test labels
(TransCLIP.py:42 reads the test labels); fewer than 8 test images per class start from all of them; the
Gaussian terms are matrix products (the official code forms the (N, K, D) differences: the same values to
float32 rounding, checked on 512-d features); when the
prior is another method's predictions the official code passes them as one tensor that `update_z` then
overwrites with z (TransCLIP_utils.py:127-128 and :23): fsbench keeps the prior fixed, as the paper's KL term
reads, and `prior_follows_z = true` reproduces the official behaviour. Kept as the official code does it:
TransCLIP-FS's graph rows are offset by the number of shots (see `update_z`; `aligned_shot_graph = true`
aligns them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fsbench.checks import check_at_least, check_list, check_positive, positive
from fsbench.method import FewShotData, register_method
from fsbench.transduction import TransductiveInputs, TransductiveStep

CHUNK_ELEMENTS = 1 << 24  # similarities per block of rows of the k-NN graph


@dataclass
class TransCLIPConfig:
    """TransCLIP hyper-parameters (official TransCLIP_solver/; see the module docstring)."""

    iterations: int = 10  # EM iterations (TransCLIP.py:53 max_iter)
    z_iterations: int = 5  # inner z updates per EM iteration (TransCLIP_utils.py:6)
    neighbors: int = 3  # k of the k-NN affinity graph (TransCLIP.py:55)
    kl_weight: float | None = None  # lambda; None: 1 zero-shot, 0.5 with shots (TransCLIP_utils.py:173,181)
    temperature: float = 50.0  # the 50 of the z, mu and var updates (TransCLIP_utils.py:17,22,42)
    confident: int = 8  # test samples per class that initialise mu, zero-shot (TransCLIP_utils.py:145)
    logit_scale: float = 100.0  # text prior softmax(scale x cos) (TransCLIP_utils.py:281)
    shots_in_em: bool = False  # TransCLIP-FS: the labelled shots join the EM, gamma picked on val (main.py:94)
    gammas: list[float] = field(default_factory=lambda: [0.002, 0.01, 0.02, 0.2])  # shot weights (utils:174)
    prior_follows_z: bool = False  # true: the official code's prior overwritten by z (see the deviations)
    aligned_shot_graph: bool = False  # TransCLIP-FS: true = W's rows in z's order (the official offsets them)

    def __post_init__(self) -> None:
        s = "transclip"
        check_at_least(s, "iterations", self.iterations, 0)
        check_at_least(s, "z_iterations", self.z_iterations, 1)
        check_at_least(s, "neighbors", self.neighbors, 1)
        check_at_least(s, "confident", self.confident, 1)
        check_positive(s, "temperature", self.temperature)
        check_positive(s, "logit_scale", self.logit_scale)
        if self.kl_weight is not None:
            check_positive(s, "kl_weight", self.kl_weight)
        check_list(s, "gammas", self.gammas, "positive numbers", positive)


@dataclass
class Shots:
    """The labelled shots of TransCLIP-FS: features (S, D), labels (S,), and the validation set."""

    features: torch.Tensor
    labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor


def knn_affinity(query: torch.Tensor, support: torch.Tensor | None, k: int, support_first: bool = True
                 ) -> torch.Tensor:
    """Sparse W ((S +) N, N): each row's k nearest test samples after its first (itself for a test row), with
    their cosine similarity; support rows first (TransCLIP_utils.py:234-254), or last (`support_first` false)."""
    rows = query if support is None else torch.cat([support, query] if support_first else [query, support])
    k = min(k, len(query) - 1)
    blocks = max(1, CHUNK_ELEMENTS // max(1, len(query)))
    index, values = [], []
    for start in range(0, len(rows), blocks):
        sim = rows[start:start + blocks] @ query.T
        top = sim.topk(k + 1, dim=-1, largest=True)
        index.append(top.indices[:, 1:])
        values.append(top.values[:, 1:])
    cols = torch.cat(index).flatten()
    row_ids = torch.arange(len(rows), device=query.device).repeat_interleave(k)
    return torch.sparse_coo_tensor(torch.stack([row_ids, cols]), torch.cat(values).flatten(),
                                   size=(len(rows), len(query)), check_invariants=True)


def gaussian_log_likelihood(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(N, K): -1/2 sum_d (x - mu_k)^2 / var_d (TransCLIP_utils.py:207-228, without the constant), expanded
    into matrix products (the official code forms the (N, K, D) differences; the same values to float32
    rounding, checked against it)."""
    inv = 1 / var
    sq = (x * x) @ inv[:, None] - 2 * x @ (mu * inv).T + ((mu * mu) @ inv)[None, :]
    return -0.5 * sq


def update_z(loglik: torch.Tensor, prior: torch.Tensor, z: torch.Tensor, W: torch.Tensor, cfg: TransCLIPConfig,
             lam: float, shots: torch.Tensor | None, follow: bool = False) -> torch.Tensor:
    """The z step (TransCLIP_utils.py:6-25), `z_iterations` times; returns the new (N, K) z. With `shots` (S, K)
    one-hot, z is extended by the shots' rows after the test rows, as the official code does (:9-10), while its
    W puts the support rows first (:240), so every row of the Laplacian term is offset by S: kept by default
    (`aligned_shot_graph` puts W's shot rows last). `follow`: the prior is z itself (the
    official code's aliasing of predictions passed as the prior, :127-128)."""
    n = len(loglik)
    full = z.clone() if shots is None else torch.cat([z, shots])
    for _ in range(cfg.z_iterations):
        x = loglik + (cfg.temperature / (cfg.neighbors * 2)) * (W.T @ full + (W @ full[:n])[:n])
        x = x - x.max(dim=1, keepdim=True).values  # numerical stability (:21)
        x = (full[:n] if follow else prior) ** lam * torch.exp(1 / cfg.temperature * x)
        full[:n] = x / x.sum(dim=1, keepdim=True)
    return full[:n].clone()


def init_mu(z: torch.Tensor, query: torch.Tensor, confident: int) -> torch.Tensor:
    """(K, D) zero-shot start: per class, the z-weighted mean of its `confident` most probable test samples,
    normalised (TransCLIP_utils.py:143-161)."""
    top = z.topk(min(confident, len(z)), dim=0).indices
    mask = torch.zeros_like(z).scatter_(0, top, 1)
    return F.normalize((z * mask).T @ query, dim=-1)


def weighted_sums(z: torch.Tensor, shots: torch.Tensor | None, gamma: float, temperature: float
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The test samples' weights z/N and the shots' gamma T/S one-hot (TransCLIP_utils.py:36,42)."""
    w = z / len(z)
    return w, (None if shots is None else (gamma * temperature / len(shots)) * shots)


def update_mu(query: torch.Tensor, z: torch.Tensor, support: torch.Tensor | None, shots: torch.Tensor | None,
              gamma: float, temperature: float) -> torch.Tensor:
    """(K, D) normalised weighted class means of the test samples and the shots (TransCLIP_utils.py:28-58)."""
    w, ws = weighted_sums(z, shots, gamma, temperature)
    mu = torch.einsum("ij,ik->jk", w, query)
    norm = w.sum(dim=0).unsqueeze(-1)
    if ws is not None:
        mu = mu + torch.einsum("ij,ik->jk", ws, support)
        norm = norm + ws.sum(dim=0).unsqueeze(-1)
    return F.normalize(mu / norm, dim=-1)


def _sq_sum(weights: torch.Tensor, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """(D,): sum_i sum_k w_ik (x_i - mu_k)^2, expanded into matrix products."""
    mass = weights.sum(dim=1)
    return mass @ (x * x) - 2 * (mu * (weights.T @ x)).sum(0) + weights.sum(0) @ (mu * mu)


def update_var(query: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, support: torch.Tensor | None,
               shots: torch.Tensor | None, gamma: float, temperature: float) -> torch.Tensor:
    """(D,) the variance shared by all classes (TransCLIP_utils.py:61-119)."""
    w, ws = weighted_sums(z, shots, gamma, temperature)
    var = _sq_sum(w, query, mu)
    if ws is not None and gamma > 0:
        return (var + _sq_sum(ws, support, mu)) / (w.sum() + ws.sum())
    return var / w.sum()


def val_accuracy(z: torch.Tensor, query: torch.Tensor, shots: Shots) -> float:
    """Validation accuracy of a z: each validation sample takes its nearest test sample's prediction
    (TransCLIP_utils.py:279, TransCLIP.py:105)."""
    nearest = (shots.val_features @ query.T).argmax(dim=1)
    return float((z[nearest].argmax(dim=1) == shots.val_labels).float().mean())


def transclip_em(query: torch.Tensor, prior: torch.Tensor, cfg: TransCLIPConfig, shots: Shots | None = None,
                 follow: bool = False, trace: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
    """TransCLIP's EM (TransCLIP.py:36-136): the (N, K) assignments z of the test features `query` (N, D,
    L2-normalised) under the prior probabilities `prior` (N, K); with `shots`, TransCLIP-FS (the z of the gamma
    with the best validation accuracy). `follow`: prior overwritten by z (official aliasing, see
    `update_z`). `trace` collects every state: W, mu0, var0, then each z, mu and var."""
    query, prior = query.float(), prior.float()
    lam = cfg.kl_weight if cfg.kl_weight is not None else (0.5 if shots is not None else 1.0)
    onehot = None if shots is None else F.one_hot(shots.labels, prior.shape[1]).to(query)
    support = None if shots is None else shots.features.float()
    if shots is None:
        mu = init_mu(prior, query, cfg.confident)
    else:  # the (normalised) sum of each class's shots (TransCLIP_utils.py:133-139)
        mu = F.normalize(onehot.T @ support, dim=-1)
    var = torch.full((query.shape[1],), 1 / query.shape[1], dtype=query.dtype, device=query.device)
    W = knn_affinity(query, support, cfg.neighbors, support_first=not cfg.aligned_shot_graph)
    if trace is not None:
        trace.update(W=[W.to_dense()], mu0=[mu], var0=[var], z=[], mu=[], var=[])
    z, best, best_z = prior.clone(), -1.0, prior
    for gamma in (cfg.gammas if shots is not None else [0.0]):
        for k in range(cfg.iterations + 1):
            z = update_z(gaussian_log_likelihood(query, mu, var), prior, z, W, cfg, lam, onehot, follow)
            _keep(trace, z=z)
            if k == cfg.iterations:
                break
            mu = update_mu(query, z, support, onehot, gamma, cfg.temperature)
            var = update_var(query, z, mu, support, onehot, gamma, cfg.temperature)
            _keep(trace, mu=mu, var=var)
        if shots is None:
            return z
        acc = val_accuracy(z, query, shots)
        if acc > best:  # the first best (TransCLIP.py:106)
            best, best_z = acc, z
    return best_z


def _keep(trace: dict[str, list[torch.Tensor]] | None, **states: torch.Tensor) -> None:
    if trace is not None:
        for key, value in states.items():
            trace[key].append(value)


@register_method("transclip")
class TransCLIP(TransductiveStep):
    """Zero-shot TransCLIP: the EM on the test set's frozen features with zero-shot CLIP's predictions as the
    prior; under a protocol without unlabelled test data it scores as zero-shot CLIP. `shots_in_em`:
    TransCLIP-FS. On top of another method: `METHOD+transclip` (`fsbench.transduction`)."""

    Config = TransCLIPConfig
    paper = ("Zanella, Gérin & Ben Ayed, Boosting Vision-Language Models with Transduction, NeurIPS 2024 "
             "(arXiv 2406.01837)")
    summary = "transductive EM on the whole unlabelled test set, zero-shot prior (+transclip on any method)"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg = self.config
        if cfg.kl_weight is None:  # the value that runs is recorded (TransCLIP_utils.py:173,181)
            self.config = dataclasses.replace(cfg, kl_weight=0.5 if cfg.shots_in_em else 1.0)
        self.weights = self.ctx.text_weights()
        self.fitted_classes = self.ctx.classes
        self.shots: Shots | None = None
        if cfg.shots_in_em and train is not None:
            if train.features is None or val.features is None:
                raise ValueError("transclip with shots_in_em needs the shots' features")
            self.shots = Shots(train.features.float(), train.labels, val.features.float(), val.labels)

    def uses_shots(self) -> bool:
        return self.config.shots_in_em

    def retarget(self) -> None:
        """Unseen classes: their prompts through the frozen text tower; the shots (of other classes) are left out."""
        self.weights = self.ctx.text_weights()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.config.logit_scale * x.float() @ self.weights.T

    def transduce(self, inputs: TransductiveInputs) -> torch.Tensor:
        """z of the EM (`transclip_em`) on one whole evaluation set, float32 outside autocast."""
        device = inputs.features.device
        shots = self.shots if self.shots is not None and self.ctx.classes == self.fitted_classes else None
        if shots is not None:
            shots = Shots(shots.features.to(device), shots.labels.to(device), shots.val_features.to(device),
                          shots.val_labels.to(device))
        follow = self.config.prior_follows_z and inputs.source is not None
        with torch.autocast(device.type, enabled=False):
            return transclip_em(inputs.features.float(), inputs.prior.float(), self.config, shots, follow)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The text classifier comes from the frozen text tower; saved shots are not kept (`--save-adapter`)."""
        self.fit(None, None)  # type: ignore[arg-type]
