"""Weights packed for oneDNN's CPU kernels (serve/packed.py, model/kernels.py): the same products as F.linear
within fp32's summation-order rounding, the same greedy tokens as a plain engine in eager and captured decode,
the state dict untouched, and never a model the engine did not load itself."""

import gc

import pytest
import torch
import torch.nn.functional as F
from hf_reference import perturb_
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek import Engine, SamplingParams, Transformer, get_preset, save_pretrained
from nanoseek.model import kernels
from nanoseek.serve.packed import DecodeLinear, pack, pack_model, packed_linear, packing_available

pytestmark = pytest.mark.skipif(not packing_available(torch.device("cpu")), reason="no oneDNN in this torch")

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [list(range(1, 20)), [7] * 9, [3], list(range(40, 5, -2)), [5, 6], list(range(9, 30))]  # > E / k rows


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40), out_features=st.integers(1, 300), in_features=st.integers(1, 200), seed=st.integers(0, 99)
)
def test_a_packed_product_equals_f_linear_up_to_summation_order(rows, out_features, in_features, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, in_features, generator=g), torch.randn(out_features, in_features, generator=g)
    # fp32 sums of in_features products in another order: a few ulps of the sum of |products|
    bound = 4 * in_features * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().T)
    assert ((packed_linear(x, pack(w)) - F.linear(x, w)).abs() <= bound + 1e-30).all()


def test_bf16_weights_pack_too():
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(96, 64).bfloat16()
    torch.testing.assert_close(packed_linear(x, pack(w)), F.linear(x, w), rtol=2**-7, atol=2**-7)


def test_the_kernel_linear_reads_a_registered_copy_until_its_owner_is_freed():
    w, x = torch.randn(8, 4), torch.randn(2, 4)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w)) and kernels.packed_product(w) is None
    kernels.register_packed(w, lambda x: torch.zeros(x.shape[0], 8), owner=w)
    assert not kernels.linear(x, w).any()  # the registered product is what runs
    assert kernels.packed_product(w[:4]) is None  # a view at the same address is another matrix
    key = w.data_ptr()
    del w
    gc.collect()
    assert key not in kernels._packed


@pytest.mark.parametrize("rows", [1, kernels.FUSED_ROWS, kernels.FUSED_ROWS + 1])
def test_a_captured_product_of_a_few_rows_is_one_fused_reduction_and_equals_f_linear(rows):
    """Up to FUSED_ROWS rows the compiled graph has no library GEMM (the product is Inductor's own loop);
    past them it calls the op, packed or not."""
    from torch._inductor.utils import run_and_get_code

    x, w = torch.randn(rows, 48), torch.randn(80, 48)
    compiled = torch.compile(kernels.linear, dynamic=False)  # (a new row count: a new graph, its code seen)
    out, code = run_and_get_code(compiled, x, w)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert ("nanoseek.linear" in "".join(code)) == (rows > kernels.FUSED_ROWS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb_(Transformer(get_preset("tiny").replace(vocab_size=300, num_hidden_layers=3)), seed=2)
    out = tmp_path_factory.mktemp("model")
    save_pretrained(model, str(out))
    return out


def engine(model, packed: bool, eager: bool = True) -> Engine:
    options = dict(device="cpu", dtype=torch.float32, block_size=4, cache_memory_mb=1, max_batched_tokens=16)
    return Engine(model, pack_weights="on" if packed else "off", enforce_eager=eager, **options)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "captured"])
def test_packed_and_plain_engines_decode_the_same_greedy_tokens(model_dir, eager):
    """Six rows route more (token, expert) pairs than the 8 experts: the captured step's every-expert path."""
    packed, plain = engine(model_dir, True, eager), engine(model_dir, False, eager)
    assert packed.packed and not plain.packed
    assert sum(isinstance(m, DecodeLinear) and m.packed for m in packed.model.modules()) > 0
    assert not any(isinstance(m, DecodeLinear) and m.packed for m in plain.model.modules())
    ours, theirs = packed.generate(PROMPTS, GREEDY), plain.generate(PROMPTS, GREEDY)
    assert [out.token_ids for out in ours] == [out.token_ids for out in theirs]


def test_packing_keeps_the_state_dict_and_the_logits(model_dir):
    plain = engine(model_dir, False).model
    packed = engine(model_dir, False).model
    before = {k: v.clone() for k, v in packed.state_dict().items()}
    assert pack_model(packed) > 0
    after = packed.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), plain(ids), rtol=1e-4, atol=1e-4)


def test_a_model_passed_in_is_never_packed(model_dir):
    """GRPO hands the engine its training policy: a packed copy would go stale at the next optimizer step."""
    from nanoseek import from_pretrained

    model = from_pretrained(model_dir, dtype=torch.float32)
    e = engine(model, True)
    assert not e.packed and not any(isinstance(m, DecodeLinear) for m in model.modules())


def test_an_unpacked_cpu_engine_still_routes_its_products_through_the_kernel(model_dir):
    """So that its captured step fuses the products of a few rows too (a `tiny` speculative step: 0.67 ms
    against 1.00 with library GEMMs)."""
    plain = engine(model_dir, False)
    linears = [m for m in plain.model.modules() if isinstance(m, DecodeLinear)]
    assert linears and not any(m.packed for m in linears)
    assert not any(type(m) is torch.nn.Linear for m in plain.model.modules())


def test_auto_packs_a_model_larger_than_the_cpus_cache_only(model_dir):
    """In the cache, oneDNN's larger per-call overhead loses (tiny: 0.70x); streaming from memory it wins."""
    from nanoseek.device import last_level_cache_bytes

    auto = Engine(model_dir, device="cpu", dtype=torch.float32)
    size = sum(p.nbytes for p in auto.model.parameters())
    assert auto.packed == (size > last_level_cache_bytes())
    assert 2**20 <= last_level_cache_bytes() <= 2**31
    with pytest.raises(ValueError, match="auto, on, off"):
        Engine(model_dir, device="cpu", pack_weights="yes")
