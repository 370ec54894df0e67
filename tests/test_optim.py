"""Learning-rate schedules and weight-decay groups."""

import itertools

import pytest

from nanoseek import Transformer, get_preset
from nanoseek.train.optim import build_optimizer, lr_at


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_schedule_warms_up_linearly_peaks_once_and_ends_at_min_lr(schedule):
    lrs = [lr_at(s, 10, 1.0, 3, schedule, min_lr_ratio=0.1) for s in range(10)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))  # never rises after the peak
    if schedule == "cosine":
        assert lrs[3] < 1.0  # the peak is not held twice


def test_wsd_holds_the_peak_until_the_decay_phase():
    lrs = [lr_at(s, 100, 1.0, 10, "wsd", decay_fraction=0.2) for s in range(100)]
    assert lrs[10:80] == [1.0] * 70 and lrs[80] < 1.0


def test_norms_are_not_decayed_and_the_gate_bias_is_not_optimised():
    model = Transformer(get_preset("tiny"))
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    decayed, plain = opt.param_groups
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert plain["weight_decay"] == 0.0
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.layers[1].mlp.gate.e_score_correction_bias) not in in_optimizer
    assert len(in_optimizer) == len(list(model.parameters()))


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="cosine"):
        lr_at(5, 10, 1.0, 1, "linear")
