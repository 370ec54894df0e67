"""The `auto` dtype: picked by the hardware, forced by NANOSEEK_AUTO_DTYPE so a machine can run as the
other kind of CPU would."""

import pytest
import torch

from nanoseek.device import (
    AUTO_DTYPE_ENV,
    cpu_features,
    cpu_has_fast_bf16,
    default_dtype,
    inference_dtype,
    other_cpu_dtype,
)
from nanoseek.train.trainer import TrainConfig, Trainer


def test_auto_follows_amx_unless_forced(monkeypatch):
    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)
    assert default_dtype("cpu") == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    assert getattr(torch, other_cpu_dtype()) != default_dtype("cpu")
    for name in ("float32", "bfloat16"):
        monkeypatch.setenv(AUTO_DTYPE_ENV, name)
        assert default_dtype("cpu") == getattr(torch, name)
        assert f"auto dtype on CPU is {name}" in cpu_features()


def test_a_misspelt_forced_dtype_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(AUTO_DTYPE_ENV, "bf16")
    with pytest.raises(ValueError, match="use one of float32, bfloat16"):
        default_dtype("cpu")


def test_the_trainer_autocasts_to_the_forced_dtype(monkeypatch, data_dir, tmp_path):
    monkeypatch.setenv(AUTO_DTYPE_ENV, "bfloat16")
    cfg = TrainConfig(out=str(tmp_path), data=str(data_dir), steps=1, batch_size=2, seq_len=16, progress=False)
    assert Trainer(cfg).amp_dtype == torch.bfloat16


def test_decoding_picks_bf16_only_where_a_probe_measures_it_faster(monkeypatch):
    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)
    tiny = inference_dtype("cpu", 64)
    assert tiny in (torch.float32, torch.bfloat16)
    if not cpu_has_fast_bf16():  # AVX-512 BF16 alone is slower than fp32: no probe, fp32
        assert tiny == torch.float32
    monkeypatch.setenv(AUTO_DTYPE_ENV, "bfloat16")
    assert inference_dtype("cpu", 64) == torch.bfloat16
