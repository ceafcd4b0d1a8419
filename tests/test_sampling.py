from __future__ import annotations

import pytest
import torch

from consortium.errors import InvalidRequestError
from consortium.model.sampling import SamplingParams, position_seed, sample

LOGITS = torch.tensor([1.0, 3.0, 2.5, 0.5, -1.0, 2.9])


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(), 0) == 1


def test_same_seed_same_tokens_different_seed_differs():
    p = SamplingParams(temperature=1.0, seed=42)
    a = [sample(LOGITS, p, i) for i in range(200)]
    assert a == [sample(LOGITS, p, i) for i in range(200)]
    b = [sample(LOGITS, SamplingParams(temperature=1.0, seed=43), i) for i in range(200)]
    assert a != b


def test_position_streams_are_independent_of_history():
    """Sampling position 7 alone gives what it gave inside a longer run (replay after rollback)."""
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    run = [sample(LOGITS, p, i) for i in range(10)]
    assert sample(LOGITS, p, 7) == run[7]
    assert len({position_seed(5, i) for i in range(1000)}) == 1000


def test_sampling_follows_the_distribution():
    p = SamplingParams(temperature=1.0, seed=1)
    n = 4000
    counts = torch.bincount(torch.tensor([sample(LOGITS, p, i) for i in range(n)]), minlength=6).double()
    expected = torch.softmax(LOGITS.double(), 0) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25  # 5 d.o.f.: p < 1e-4 for a correct sampler


def test_top_k_and_top_p_restrict_support():
    assert {sample(LOGITS, SamplingParams(1.0, top_k=1, seed=s), 0) for s in range(50)} == {1}
    assert {sample(LOGITS, SamplingParams(1.0, top_k=2, seed=s), 0) for s in range(200)} == {1, 5}
    assert {sample(LOGITS, SamplingParams(1.0, top_p=0.01, seed=s), 0) for s in range(50)} == {1}
    # top-p 0.5 keeps the smallest prefix reaching half the mass: tokens 1 and 5
    probs = torch.softmax(LOGITS, 0)
    assert probs[1] < 0.5 < probs[1] + probs[5]
    assert {sample(LOGITS, SamplingParams(1.0, top_p=0.5, seed=s), 0) for s in range(200)} == {1, 5}


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0}, {"top_p": 1.5}])
def test_invalid_parameters(kw):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kw)


def test_logits_from_any_device_or_layout_sample_alike():
    """sample() copies the logits to the CPU where its generator draws (CUDA logits used to meet CPU
    random numbers): a non-contiguous column, a [1, vocab] row and a graph-attached tensor give the
    tokens of the plain fp32 vector, and so do CUDA logits where there is a GPU."""
    p = SamplingParams(temperature=0.7, top_k=4, seed=9)
    wide = torch.stack([LOGITS, LOGITS.flip(0)], dim=1)  # column 0 is a non-contiguous view
    attached = LOGITS.clone().requires_grad_(True)
    for i in range(20):
        want = sample(LOGITS, p, i)
        assert sample(wide[:, 0], p, i) == sample(LOGITS[None, :], p, i) == sample(attached, p, i) == want
    if torch.cuda.is_available():  # the case this guards; CI has no GPU (benchmarks/gpu_check.sh runs it)
        assert all(sample(LOGITS.cuda(), p, i) == sample(LOGITS, p, i) for i in range(20))
