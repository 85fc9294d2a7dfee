"""MatchNet's local match shares one exponential between its row and column soft assignments: it must
equal the two max-shifted softmaxes it replaces, and stay finite over the whole temperature range."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.nn.siamese import MAX_INVERSE_TEMPERATURE
from tests.conftest import make_model


def softmax_reference(corr: torch.Tensor, temperature: float) -> torch.Tensor:
    a_to_b = (torch.softmax(corr / temperature, dim=2) * corr).sum(dim=2).mean(dim=1)
    b_to_a = (torch.softmax(corr / temperature, dim=1) * corr).sum(dim=1).mean(dim=1)
    return (a_to_b + b_to_a) / 2


@pytest.mark.parametrize("temperature", [1 / MAX_INVERSE_TEMPERATURE, 0.05, 0.5])
def test_local_match_equals_the_softmax_form(temperature):
    net = make_model().net
    with torch.no_grad():
        net.log_temperature.fill_(math.log(temperature))
    generator = torch.Generator().manual_seed(0)
    la = F.normalize(torch.randn(3, 196, 128, generator=generator, dtype=torch.float64), dim=2)
    lb = torch.cat([la[:1], -la[1:2], F.normalize(torch.randn(1, 196, 128, generator=generator, dtype=torch.float64), dim=2)])
    net = net.double()
    reference = softmax_reference(la @ lb.transpose(1, 2), float(net.log_temperature.exp()))
    local = net.local_match(la, lb)
    torch.testing.assert_close(local, reference, atol=1e-9, rtol=1e-9)
    # float32 at the coldest temperature allowed: identical pairs (corr = 1) and opposite ones (corr = -1) stay finite.
    local32 = net.float().local_match(la.float(), lb.float())
    assert torch.isfinite(local32).all()
    torch.testing.assert_close(local32, reference.float(), atol=1e-5, rtol=1e-5)


def test_temperature_below_the_floor_acts_as_the_floor():
    net = make_model().net
    la = F.normalize(torch.randn(2, 49, 128), dim=2)
    with torch.no_grad():
        net.log_temperature.fill_(math.log(1e-4))
    colder = net.local_match(la, la.flip(0))
    with torch.no_grad():
        net.log_temperature.fill_(-math.log(MAX_INVERSE_TEMPERATURE))
    torch.testing.assert_close(colder, net.local_match(la, la.flip(0)))
    assert torch.isfinite(colder).all()
