"""Out-of-distribution detection scores and metrics, numpy only (the `ood` protocol's arithmetic).

Follows MCM (Ming et al., "Delving into Out-of-Distribution Detection with Vision-Language
Representations", NeurIPS 2022; github.com/deeplearning-wisc/MCM at ea7130f, `utils/detection_util.py`):

- Scores, computed on cosine similarities `cos` of the image with each class (MCM's `output`,
  detection_util.py:232) at temperature T (`--T`, default 1, eval_ood_detection.py:31):
  `mcm` = max softmax(cos / T) (:236, :248); `max_logit` = max cos (:233-234, :248); `energy` =
  T * logsumexp(cos / T) (:238-239, stored negated there and negated back at :259). Higher = more
  in-distribution for all three.
- In-distribution is the positive class (`get_measures`, :108-119: ID scores first, label 1).
- AUROC: scikit-learn's `roc_auc_score` (:115); here the Mann-Whitney statistic with tied scores
  counted one half, which is the same number (the area under the ROC curve whose points are the
  distinct score values).
- FPR95: `fpr_and_fdr_at_recall` (:66-106). Thresholds are the distinct score values (:89-90), so a
  group of tied scores is accepted or rejected as a whole; the threshold chosen is the one whose
  TPR is *nearest* 0.95 (:104 `argmin(abs(recall - recall_level))`, among thresholds up to the first
  that reaches TPR 1, searched from the highest TPR down (:100-102): a tie in distance goes to the
  higher TPR, and among thresholds of equal TPR the lowest one, which accepts the most OOD images).
  That is `rule="nearest"`, the default. `rule="at_least"` is the other common definition (the FPR
  at the first threshold whose TPR reaches 0.95). On continuous scores they pick neighbouring
  thresholds (10,000 + 10,000 normal scores: at most 0.27 points apart over 20 draws); on coarsely
  tied scores they differ more (tests/fixtures/ood: 51.6 vs 64.4 on scores rounded to one decimal).

Both metrics are fractions in [0, 1] here; the protocol stores them in percent, as MCM reports
(`print_measures`, :37-45).
"""

from __future__ import annotations

import numpy as np

SCORES = ("mcm", "max_logit", "energy")
FPR_RULES = ("nearest", "at_least")


def ood_scores(logits: np.ndarray, score: str = "mcm", cosine_scale: float | None = None,
               temperature: float = 1.0) -> np.ndarray:
    """One score per row of `logits` (N, C); higher means more in-distribution.

    Args:
        logits: a method's class scores.
        score: "mcm", "max_logit" or "energy" (see the module docstring).
        cosine_scale: s where `logits` = s x cosine similarity (CLIP-style heads, `Method.cosine_scale`);
            the scores are then computed on `logits / s`, MCM's cosine similarities. None: on the logits
            themselves (a method whose logits have no cosine form).
        temperature: MCM's T (1 in its code and paper).
    """
    if score not in SCORES:
        raise ValueError(f"unknown OOD score {score!r}; known: {', '.join(SCORES)}")
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValueError(f"logits must be (N, C) with C >= 1, got shape {z.shape}")
    if cosine_scale is not None:
        z = z / float(cosine_scale)
    if score == "max_logit":
        return z.max(axis=1)
    u = z / temperature
    top = u.max(axis=1)
    total = np.exp(u - top[:, None]).sum(axis=1)  # >= 1: the top class contributes exp(0)
    if score == "mcm":
        return 1.0 / total  # max softmax = exp(top) / sum exp(u)
    return temperature * (top + np.log(total))  # T * logsumexp(u)


def _pair(id_scores, ood_scores_) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(id_scores, dtype=np.float64).ravel()
    neg = np.asarray(ood_scores_, dtype=np.float64).ravel()
    if not len(pos) or not len(neg):
        raise ValueError(f"need scores of both kinds, got {len(pos)} in-distribution and {len(neg)} OOD")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("OOD scores must be finite")
    return pos, neg


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values` in ascending order, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], len(values)]  # exclusive
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(id_scores, ood_scores_) -> float:
    """Area under the ROC curve with in-distribution as the positive class: the probability that an ID
    image scores above an OOD one, ties counting one half (= `sklearn.metrics.roc_auc_score`)."""
    pos, neg = _pair(id_scores, ood_scores_)
    ranks = average_ranks(np.concatenate([pos, neg]))
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def _roc_steps(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) accepted at each distinct score, thresholds from high to low
    (MCM's detection_util.py:82-94)."""
    scores = np.concatenate([pos, neg])
    is_id = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, is_id = scores[order], is_id[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # the last index of each distinct value
    tps = np.cumsum(is_id, dtype=np.float64)[last]
    return tps, 1 + last - tps


def fpr_at_tpr(id_scores, ood_scores_, tpr: float = 0.95, rule: str = "nearest") -> float:
    """The fraction of OOD images accepted at the threshold that keeps `tpr` of the ID images.

    `rule` "nearest" is MCM's (the threshold whose TPR is nearest `tpr`), "at_least" the first threshold
    whose TPR reaches `tpr`; see the module docstring.
    """
    if rule not in FPR_RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {', '.join(FPR_RULES)}")
    pos, neg = _pair(id_scores, ood_scores_)
    tps, fps = _roc_steps(pos, neg)
    recall = tps / tps[-1]
    if rule == "at_least":
        cut = int(np.argmax(recall >= tpr))
    else:
        full = int(tps.searchsorted(tps[-1]))  # the first threshold with every ID image accepted
        candidates = np.arange(full, -1, -1)  # from the highest TPR down, as MCM's reversed slice
        cut = int(candidates[np.argmin(np.abs(recall[candidates] - tpr))])
    return float(fps[cut] / len(neg))


def detection_metrics(id_logits: np.ndarray, ood_logits: np.ndarray, score: str = "mcm",
                      cosine_scale: float | None = None) -> dict[str, float]:
    """{"auroc", "fpr95"} in percent of one OOD set against the ID test set, from the method's logits."""
    pos = ood_scores(id_logits, score, cosine_scale)
    neg = ood_scores(ood_logits, score, cosine_scale)
    return {"auroc": 100.0 * auroc(pos, neg), "fpr95": 100.0 * fpr_at_tpr(pos, neg)}
