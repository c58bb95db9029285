"""ZERO (methods/zero.py) against the official code (github.com/FarinaMatteo/zero, fixtures made outside the
project: tests/fixtures/zero/README.md): the vote on fixed features, ties included; and what the method returns."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fsbench.config import method_config
from fsbench.method import Context
from fsbench.methods.zero import NO_VOTE, Zero, break_tie, zero_vote
from fsbench.prompts import frozen_image_features

FIXTURES = Path(__file__).parent / "fixtures" / "zero"
CPU = torch.device("cpu")


def test_votes_equal_the_official_zero_including_broken_ties():
    cases = torch.load(FIXTURES / "official.pt", weights_only=False)["cases"]
    broken = 0
    for case in cases:
        logits = case["z_img"] @ case["z_txt"].T  # the official unscaled logits (ttas/zero.py:75)
        votes = zero_vote(logits, case["gamma"], 1 / case["temp"])
        assert torch.equal(votes, case["votes"])
        broken += int(votes.sum()) > int(len(logits) * case["gamma"])  # a broken tie adds one vote
    assert len(cases) == 9 and broken == 5  # 4 searched for, 1 among the random ones (64 views, 37 classes)


def test_a_tie_no_remaining_view_breaks_goes_to_the_class_the_first_remaining_view_scores_highest():
    rest = torch.tensor([[0.0, 0.1, 0.9, 0.2], [0.0, 0.0, 0.9, 0.3]])  # both vote for class 2, not tied
    assert break_tie([0, 3, 1], rest) == 3
    assert break_tie([1, 2], rest) == 2  # the first remaining view votes for a tied class
    assert break_tie([1, 3], torch.zeros(0, 4)) == 1  # no view left: the class torch.max returned


def test_online_logits_are_log_vote_shares_and_inductive_logits_zero_shot(tiny, synthetic):
    method = Zero(method_config(Zero, {"views": 4}), Context(tiny, synthetic, CPU, 1, 0))
    method.fit(None, None)  # type: ignore[arg-type]
    views = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = method.online_logits(views)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    for scores, one in zip(out, views, strict=True):
        votes = zero_vote(frozen_image_features(tiny, one) @ method.text.T, 0.3, 100.0)
        assert votes.sum() >= 1 and scores.argmax() == votes.argmax()
        torch.testing.assert_close(scores.exp(), (votes / votes.sum()).clamp_min(NO_VOTE))
    images = views[:, 0]
    with torch.no_grad():
        text = F.normalize(tiny.model.encode_text(tiny.tokenize([f"a photo of a {c}." for c in synthetic.classnames])),
                           dim=-1)
    want = 100.0 * frozen_image_features(tiny, images) @ text.T  # encode_tokens runs the truncated sequence: ~1e-5
    torch.testing.assert_close(method.logits(images), want, rtol=1e-5, atol=1e-4)
