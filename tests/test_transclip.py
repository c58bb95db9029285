"""TransCLIP (methods/transclip.py) against the official solver, and `METHOD+transclip` (fsbench.transduction).

The official EM's every state (W, the initial mu and variance, each z, mu and variance, the final z) on fixed
random features is in tests/fixtures/transclip/official.pt (README.md there: how it was made); fsbench's
`transclip_em` reproduces them to float32 tolerance, zero-shot, on top of a method's predictions (with the
official prior aliasing, `prior_follows_z`), on top of text prototypes, and few-shot (TransCLIP-FS).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fsbench.errors import ConfigError, UnknownNameError
from fsbench.method import METHODS
from fsbench.methods.transclip import Shots, TransCLIPConfig, knn_affinity, transclip_em
from fsbench.transduction import Composed, TransductiveInputs, probability_logits

FIXTURE = Path(__file__).parent / "fixtures" / "transclip" / "official.pt"


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE)


def _run(official, case: str, prior: torch.Tensor, shots: Shots | None = None, follow: bool = False):
    trace: dict[str, list[torch.Tensor]] = {}
    z = transclip_em(official["input.query"], prior, TransCLIPConfig(), shots, follow, trace)
    return z, trace


def _check(official, case: str, z: torch.Tensor, trace: dict[str, list[torch.Tensor]]) -> None:
    W = torch.sparse_coo_tensor(official[f"{case}.W_indices"], official[f"{case}.W_values"],
                                check_invariants=True).to_dense()
    torch.testing.assert_close(trace["W"][0], W, rtol=0, atol=1e-6)
    torch.testing.assert_close(trace["mu0"][0], official[f"{case}.mu0"][:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trace["var0"][0], official[f"{case}.std0"])
    assert len(trace["z"]) == len(official[f"{case}.z"]) and len(trace["mu"]) == len(official[f"{case}.mu"])
    for i, (ours, theirs) in enumerate(zip(trace["z"], official[f"{case}.z"], strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5, msg=lambda m, i=i: f"z update {i}: {m}")
    for i, (ours, theirs) in enumerate(zip(trace["mu"], official[f"{case}.mu"], strict=True)):
        torch.testing.assert_close(ours, theirs[:, 0], rtol=1e-4, atol=2e-5, msg=lambda m, i=i: f"mu {i}: {m}")
    for i, (ours, theirs) in enumerate(zip(trace["var"], official[f"{case}.std"], strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7, msg=lambda m, i=i: f"var {i}: {m}")
    assert torch.equal(z.argmax(1), official[f"{case}.final_z"].argmax(1)) or case == "few_shot"


def test_zero_shot_em_equals_the_official_solver(official):
    """Zero-shot TransCLIP (main.py:91-93): the prior is softmax(100 f t^T) of the text classifier."""
    prior = F.softmax(100 * official["input.query"] @ official["input.text"].T, dim=1)
    z, trace = _run(official, "zero_shot", prior)
    torch.testing.assert_close(official["zero_shot.y_hat0"], prior)
    _check(official, "zero_shot", z, trace)
    torch.testing.assert_close(z, official["zero_shot.final_z"], rtol=1e-4, atol=2e-5)


def test_on_top_of_predictions_equals_the_official_solver_with_its_prior_aliasing(official):
    """Another method's softmaxed predictions as `initial_predictions` (main.py:109-111): the official update
    overwrites the prior with z (`prior_follows_z`); the fixed prior of the paper gives other numbers."""
    prior = official["input.prior"]
    z, trace = _run(official, "predictions", prior, follow=True)
    _check(official, "predictions", z, trace)
    fixed, _ = _run(official, "predictions", prior, follow=False)
    assert not torch.allclose(fixed, official["predictions.final_z"], atol=1e-3)


def test_on_top_of_text_prototypes_equals_the_official_solver(official):
    """A text-only method's prototypes (`initial_prototypes`): the prior softmax(100 f p^T) stays fixed."""
    prior = F.softmax(100 * official["input.query"] @ official["input.base"].T, dim=1)
    z, trace = _run(official, "prototypes", prior)
    _check(official, "prototypes", z, trace)


def test_few_shot_em_equals_the_official_solver(official):
    """TransCLIP-FS (main.py:94-97): the shots join the EM, four gammas warm-started in turn; the z kept is that
    of the best validation accuracy, whose test accuracy is what the official solver returns."""
    prior = F.softmax(100 * official["input.query"] @ official["input.text"].T, dim=1)
    shots = Shots(official["input.support"], official["input.support_labels"], official["input.val"],
                  official["input.val_labels"])
    z, trace = _run(official, "few_shot", prior, shots)
    _check(official, "few_shot", z, trace)
    acc = 100 * float((z.argmax(1) == official["input.labels"]).float().mean())
    assert acc == pytest.approx(float(official["few_shot.acc"]), abs=1e-4)


def test_knn_affinity_in_blocks_equals_one_block(monkeypatch):
    import fsbench.methods.transclip as tc

    x = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    whole = knn_affinity(x, x[:5], 3).to_dense()
    monkeypatch.setattr(tc, "CHUNK_ELEMENTS", 64)  # one row per block
    torch.testing.assert_close(knn_affinity(x, x[:5], 3).to_dense(), whole)


def test_composed_names_resolve_with_did_you_mean():
    cls = METHODS.get("linear_probe+transclip")
    assert cls is METHODS.get("LINEAR_PROBE+transclip") and issubclass(cls, Composed)
    assert cls.name == "linear_probe+transclip" and cls.test_time == "transductive"
    with pytest.raises(UnknownNameError, match="did you mean 'linear_probe'"):
        METHODS.get("linear_prob+transclip")
    with pytest.raises(UnknownNameError, match="did you mean 'lora\\+transclip'"):
        METHODS.get("lora+transclp")
    with pytest.raises(UnknownNameError, match="steps: transclip"):
        METHODS.get("lora+coop")
    with pytest.raises(UnknownNameError, match="METHOD\\+STEP"):
        METHODS.get("lora+transclip+transclip")
    with pytest.raises(ConfigError, match="already uses the unlabelled test data"):
        METHODS.get("transclip+transclip")


def test_probability_logits_keep_argmax_and_softmax():
    p = torch.tensor([[0.7, 0.3, 0.0], [0.1, 0.2, 0.7]])
    logits = probability_logits(p)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits.softmax(-1), p)
    assert TransductiveInputs(p, p).source is None
