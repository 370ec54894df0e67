"""The inference engine against a plain full-forward loop and against transformers' generate."""

import copy

import pytest
import torch
from hf_reference import make_hf_model, perturb_

from nanoseek import Engine, SamplingParams, Transformer, get_preset, save_pretrained
from nanoseek.model.moe import Gate, RoutedExperts
from nanoseek.serve.kv_cache import CacheSpec, LatentPool
from nanoseek.serve.sampling import sample_token

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return perturb_(Transformer(get_preset("tiny").replace(vocab_size=300, num_hidden_layers=3)), seed=2).eval()


def full_forward_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def engine(model, **kwargs) -> Engine:
    # eager: these tests check the engine, not compilation (test_a_captured_decode_step_gives_the_eager_tokens)
    options = dict(
        device="cpu", dtype=torch.float32, block_size=4, cache_memory_mb=1, max_batched_tokens=16, enforce_eager=True
    )
    return Engine(model, **(options | kwargs))


PROMPTS = [list(range(1, 20)), list(range(5, 50, 3)), [7] * 40, [3]]


def test_greedy_equals_a_full_forward_loop_with_chunked_prefill(model):
    outs = engine(model).generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == full_forward_greedy(model, prompt, 10)
        assert out.finish_reason == "length" and out.completion_tokens == 10


def test_prompt_logprobs_equal_a_full_forward_pass_with_chunked_prefill_and_after_a_cache_hit(model):
    """Scoring a prompt (max_tokens 0) in 16-token chunks gives each token's log-probability under the
    whole-prompt forward pass, with the top alternatives; the same again once the prompt's blocks are cached."""
    prompt = list(range(5, 90, 2))  # 43 tokens: three prefill chunks
    with torch.no_grad():
        expected = model(torch.tensor([prompt]))[0].float().log_softmax(-1)
    eng = engine(model)
    for _ in range(2):  # the second time its blocks are in the prefix cache
        [out] = eng.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=3))
        assert out.token_ids == [] and out.finish_reason == "length" and out.prompt_logprobs[0] is None
        scored = torch.tensor([lp for lp, _ in out.prompt_logprobs[1:]])
        torch.testing.assert_close(
            scored, expected[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0], rtol=0, atol=1e-5
        )
        top = expected[:-1].topk(3, dim=-1)
        assert [list(alt) for _, alt in out.prompt_logprobs[1:]] == top.indices.tolist()
    [out] = eng.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0))
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[1][1] is None
    assert out.token_ids == full_forward_greedy(model, prompt, 2)


def routed_experts(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The sorted expert indices every MoE layer chose for each position of ids [1, T]: [layers, T, k]."""
    chosen = []
    hooks = [
        g.register_forward_hook(lambda m, i, out: chosen.append(out[1])) for g in model.modules() if isinstance(g, Gate)
    ]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return torch.stack(chosen).sort(-1).values


def test_a_bf16_engine_scores_its_tokens_within_bf16_rounding_of_the_fp32_model(model):
    """The bf16 engine (the `auto` choice on CPUs with AMX) rounds the residual stream and each weight to
    8 significant bits: each of the 2L+1 matmul stages (attention and MLP per layer, then the head) moves a
    logit by at most 2^-8 of the largest logit, and a log-probability moves by at most twice that. Where
    the rounding flips a top-k routing choice the output jumps (routing is not continuous): that position
    and the later ones, which attend to it, are left out, and must stay few."""
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    bf16 = engine(bf16_model, dtype=torch.bfloat16)
    outs = bf16.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1))
    positions = flipped = compared = 0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logits = model(ids)[0, len(prompt) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        same = (routed_experts(model, ids) == routed_experts(bf16_model, ids)).all(-1).all(0)
        positions, flipped = positions + len(same), flipped + int((~same).sum())
        same = same.cumprod(0).bool()[len(prompt) - 1 : -1]  # later positions attend to a flipped one
        compared += int(same.sum())
        bound = 2 * (2 * model.cfg.num_hidden_layers + 1) * 2**-8 * logits.abs().max().item()
        got = torch.tensor([lp for lp, _ in out.logprobs])
        torch.testing.assert_close(got[same], expected[same], rtol=0, atol=bound)
    assert flipped <= 0.05 * positions and compared >= 0.5 * sum(len(out.token_ids) for out in outs)


def test_a_batch_gives_the_same_results_as_one_request_at_a_time(model):
    together = engine(model).generate(PROMPTS, GREEDY)
    alone = [engine(model).generate([p], GREEDY)[0] for p in PROMPTS]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_greedy_equals_transformers_generate_on_the_same_checkpoint(tmp_path):
    reference = make_hf_model(tmp_path, seed=4)
    reference.generation_config.eos_token_id = None
    ours = Engine(tmp_path, device="cpu", dtype=torch.float32, block_size=8, enforce_eager=True)
    prompt = torch.randint(0, 211, (1, 23), generator=torch.Generator().manual_seed(0))
    expected = reference.generate(prompt, max_new_tokens=12, do_sample=False)[0, 23:].tolist()
    [out] = ours.generate([prompt[0].tolist()], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert out.token_ids == expected


def test_a_full_cache_preempts_and_recomputes_instead_of_failing(model):
    small = engine(
        model, cache_memory_mb=24 * CacheSpec.for_model(model.cfg, torch.float32).bytes_per_token * 4 / 2**20
    )
    assert small.block_manager.num_blocks == 24  # 96 token slots for 4 requests needing ~120
    outs = small.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert small.metrics.preemptions > 0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == full_forward_greedy(model, prompt, 16)
    assert small.block_manager.num_free == 24  # every block back


def test_cancelling_frees_the_blocks_at_once(model):
    eng = engine(model)
    keep = eng.add_request(PROMPTS[0], GREEDY)
    drop = eng.add_request(PROMPTS[2], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    for _ in range(4):
        eng.step()
    held = len(eng.sequences[drop].blocks)
    free_before = eng.block_manager.num_free
    assert eng.cancel(drop).finish_reason == "cancelled"
    assert held > 0 and eng.block_manager.num_free >= free_before + 1 and drop not in eng.sequences
    outputs = {}
    while eng.has_unfinished():
        outputs |= {out.request_id: out for out in eng.step()}
    assert outputs[keep].token_ids == full_forward_greedy(model, PROMPTS[0], 10)
    assert eng.sequences == {}  # finished requests leave the engine


def test_a_shared_prefix_is_served_from_cache(model):
    eng = engine(model)
    prefix = list(range(10, 42))  # 32 tokens = 8 full blocks
    [first] = eng.generate([[*prefix, 1, 2]], GREEDY)
    [second] = eng.generate([[*prefix, 3]], GREEDY)
    assert first.cached_tokens == 0 and second.cached_tokens == 32
    assert second.token_ids == full_forward_greedy(model, [*prefix, 3], 10)
    assert eng.metrics.prefix_hit_tokens == 32


def test_cache_bytes_are_the_mla_latent_and_rope_key_only(model):
    cfg = model.cfg
    bf16 = CacheSpec.for_model(cfg, torch.bfloat16)
    assert bf16.bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
    pool = LatentPool(bf16, 64, torch.device("cpu"))
    assert pool.kv.numel() * pool.kv.element_size() == 64 * bf16.bytes_per_token
    fp8 = CacheSpec.for_model(cfg, torch.bfloat16, fp8=True)
    v3 = get_preset("v3-671b")
    v3_ratio = (
        CacheSpec.for_model(v3, torch.bfloat16, fp8=True).bytes_per_token
        / CacheSpec.for_model(v3, torch.bfloat16).bytes_per_token
    )
    assert fp8.bytes_per_token < bf16.bytes_per_token and v3_ratio < 0.6


def test_fp8_latent_cache_stays_within_the_e4m3_bound(model):
    spec = CacheSpec.for_model(model.cfg, torch.float32, fp8=True)
    pool = LatentPool(spec, 32, torch.device("cpu"))
    latent, rope = torch.randn(32, spec.latent) * 3, torch.randn(32, spec.rope)
    pool.write(0, torch.arange(32), latent, rope)
    back = pool.read(0, torch.arange(32)[None])[0]
    amax = latent.abs().amax(-1, keepdim=True)
    bound = 2**-4 * latent.abs() + 2**-10 * amax / 448  # E4M3 rounding, per-token scale amax / 448
    assert ((back[:, : spec.latent] - latent).abs() <= bound * (1 + 1e-6)).all()
    assert torch.equal(back[:, spec.latent :], rope)
    outs = engine(model, fp8_cache=True).generate(PROMPTS[:2], GREEDY)
    assert all(o.completion_tokens == 10 for o in outs)


def test_sampling_is_seeded_and_filters_apply(model):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a = engine(model).generate([PROMPTS[0]], params)[0]
    b = engine(model).generate([PROMPTS[0], PROMPTS[1]], [params, params])[0]  # other requests in the batch
    assert a.token_ids == b.token_ids
    top1 = engine(model).generate([PROMPTS[1]], SamplingParams(max_tokens=8, top_k=1, seed=1, ignore_eos=True))[0]
    assert top1.token_ids == full_forward_greedy(model, PROMPTS[1], 8)


def test_unfiltered_sampling_draws_the_softmax_and_a_seed_ignores_the_rows_beside_it():
    """Rows without top-k/top-p/min-p sample in vocabulary order (no sort): the frequencies of 4,000 seeded
    draws match the softmax, and a seeded row draws the same token beside a filtered row as alone."""
    from nanoseek.serve.sampling import sample_batch

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    plain = SamplingParams(temperature=1.0)
    draws = [sample_batch(logits, [plain], [torch.Generator().manual_seed(s)], [None])[0].token for s in range(4000)]
    frequencies = torch.bincount(torch.tensor(draws), minlength=6) / len(draws)
    assert (frequencies - logits[0].softmax(-1)).abs().max() < 0.03
    nucleus = SamplingParams(temperature=1.0, top_p=0.5)
    for seed in range(20):
        alone = sample_batch(logits, [plain], [torch.Generator().manual_seed(seed)], [None])[0].token
        gens = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)]
        beside = sample_batch(logits.repeat(2, 1), [plain, nucleus], gens, [None, None])
        assert beside[0].token == alone and beside[1].token == 5  # top_p 0.5 keeps only the likeliest


def test_stop_tokens_and_logprobs(model):
    expected = full_forward_greedy(model, PROMPTS[0], 10)
    params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[expected[3]], logprobs=3, ignore_eos=True)
    [out] = engine(model).generate([PROMPTS[0]], params)
    stop_at = expected.index(expected[3]) + 1
    assert out.token_ids == expected[:stop_at] and out.finish_reason == "stop"
    logprob, top = out.logprobs[0]
    assert len(top) == 3 and max(top.values()) == pytest.approx(logprob) and logprob <= 0


def test_prompts_that_cannot_fit_are_refused(model):
    with pytest.raises(ValueError, match="exceeds"):
        engine(model).add_request([1] * 1020, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine(model).add_request([], GREEDY)


def test_engine_loads_a_model_folder_with_its_tokenizer(tmp_path, tokenizer):
    model = Transformer(get_preset("tiny").replace(vocab_size=tokenizer.vocab_size))
    save_pretrained(model, str(tmp_path))
    tokenizer.save(tmp_path)
    eng = Engine(tmp_path, device="cpu", dtype=torch.float32, enforce_eager=True)
    [out] = eng.generate(["def add(a, b):"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert "".join(eng.stream("x = ", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))) == (
        eng.generate(["x = "], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0].text
    )


def mtp_model(vocab: int = 300, seed: int = 2) -> Transformer:
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(vocab_size=vocab, num_hidden_layers=2, num_nextn_predict_layers=1)
    return perturb_(Transformer(cfg), seed=seed).eval()


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_is_identical_to_plain_greedy(k):
    model = mtp_model()
    params = SamplingParams(max_tokens=15, temperature=0, ignore_eos=True)
    plain = engine(model).generate(PROMPTS, params)
    spec = engine(model, speculative_tokens=k)
    fast = spec.generate(PROMPTS, params)
    assert [o.token_ids for o in fast] == [o.token_ids for o in plain]
    m = spec.metrics
    assert m.drafted_tokens > 0
    # By draft position: a draft counts as kept only after every draft before it, so the rates never rise.
    rates = spec.stats()["spec_acceptance_by_position"]
    assert len(rates) == k and rates == sorted(rates, reverse=True)
    assert (sum(m.drafted_at), sum(m.accepted_at)) == (m.drafted_tokens, m.accepted_tokens)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_constrained_decoding_with_mtp_drafts_stays_in_the_grammar_and_greedy_equals_plain(tokenizer, temperature):
    """JSON under a schema from an untrained model, with and without MTP drafts: every reply validates;
    greedy, the drafted reply equals the plain one (drafts that leave the grammar are cut, and the
    verifier's logits are masked per draft position)."""
    import json

    import jsonschema

    from nanoseek.serve.grammar import json_grammar

    properties = {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "tag": {"enum": ["ab", "cd"]}}
    schema = {"type": "object", "properties": properties, "required": ["n", "tag"], "additionalProperties": False}
    model = mtp_model(vocab=tokenizer.vocab_size, seed=4)
    params = SamplingParams(
        max_tokens=60, temperature=temperature, seed=1, grammar=json_grammar(tokenizer, schema, False)
    )
    prompts = [tokenizer.encode("a json object: "), tokenizer.encode("another: ")]
    plain = engine(model, tokenizer=tokenizer).generate(prompts, params)
    spec = engine(model, tokenizer=tokenizer, speculative_tokens=2)
    drafted = spec.generate(prompts, params)
    for out in plain + drafted:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    if temperature == 0:
        assert [o.token_ids for o in drafted] == [o.token_ids for o in plain]
        assert spec.metrics.drafted_tokens > 0  # drafts inside the grammar were verified


def test_logit_bias_holds_with_speculative_decoding():
    """A biased request is never drafted (the drafter and verifier sample without biases): the bias wins."""
    spec = engine(mtp_model(), speculative_tokens=2)
    params = [
        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={7: 100.0}),
        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
    ]
    biased, plain = spec.generate(PROMPTS[:2], params)
    assert biased.token_ids == [7] * 6 and plain.token_ids != [7] * 6


def test_speculative_sampling_keeps_the_target_distribution():
    """Chi-square of the first two sampled tokens (where the second goes through draft-and-verify)
    against the exact joint distribution from full forward passes."""
    vocab, n = 8, 4000
    model = mtp_model(vocab=vocab, seed=5)
    prompt = [1, 2, 3, 4, 5]
    with torch.no_grad():
        p1 = model(torch.tensor([prompt]))[0, -1].softmax(-1)
        p2 = torch.stack([model(torch.tensor([[*prompt, a]]))[0, -1].softmax(-1) for a in range(vocab)])
    expected = (p1[:, None] * p2).flatten() * n  # [vocab * vocab]
    spec = engine(model, speculative_tokens=1, max_seqs=n, max_batched_tokens=8 * n, cache_memory_mb=64)
    params = [SamplingParams(max_tokens=2, temperature=1.0, seed=s, ignore_eos=True) for s in range(n)]
    outs = spec.generate([prompt] * n, params)
    assert spec.metrics.drafted_tokens > 0 and 0 < spec.metrics.accepted_tokens < spec.metrics.drafted_tokens
    observed = torch.bincount(torch.tensor([o.token_ids[0] * vocab + o.token_ids[1] for o in outs]), minlength=64)
    big = expected >= 5  # pool the rare cells, as the chi-square approximation needs
    obs = torch.cat([observed[big].float(), observed[~big].sum().float()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    chi2 = ((obs - exp) ** 2 / exp).sum().item()
    dof = len(obs) - 1
    critical = dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3  # Wilson-Hilferty, p = 0.001
    assert chi2 < critical, f"chi2 {chi2:.1f} >= {critical:.1f} with {dof} degrees of freedom"


def test_speculative_decoding_needs_an_mtp_module(model):
    with pytest.raises(ValueError, match="MTP"):
        engine(model.__class__(model.cfg.replace(num_nextn_predict_layers=0)), speculative_tokens=2)


def test_stats_report_load_cache_and_latency(model):
    eng = engine(model)
    eng.add_request(PROMPTS[0], GREEDY)
    eng.add_request(PROMPTS[2], GREEDY)
    eng.step()
    during = eng.stats()
    assert during["running"] + during["waiting"] == 2 and during["cache_use"] > 0
    while eng.scheduler.has_work():
        eng.step()
    after = eng.stats()
    assert after["running"] == after["waiting"] == 0 and after["cache_use"] == 0
    assert after["generated_tokens"] == 20 and after["mean_ttft_s"] > 0 and after["mean_itl_s"] > 0


def test_accepted_drafts_advance_the_cache_correctly(monkeypatch):
    """Oracle drafts (the true greedy continuation, or a wrong token) exercise acceptance bookkeeping."""
    model = mtp_model()
    params = SamplingParams(max_tokens=15, temperature=0, ignore_eos=True)
    truth = {tuple(p): full_forward_greedy(model, p, 20) for p in PROMPTS}
    spec = engine(model, speculative_tokens=3)

    def oracle_draft(seqs):
        for i, seq in enumerate(seqs):
            if seq.num_computed + 1 != len(seq):
                continue
            future = truth[tuple(seq.prompt)][seq.num_output : seq.num_output + 3]
            if i % 2:  # every other sequence gets its last draft wrong
                future[-1] = (future[-1] + 1) % model.cfg.vocab_size
            assert spec.scheduler.reserve(seq, len(seq) + 3)
            seq.spec.drafts = future
            seq.spec.draft_probs = torch.nn.functional.one_hot(torch.tensor(future), model.cfg.vocab_size).float()

    monkeypatch.setattr(spec, "_draft", oracle_draft)
    outs = spec.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == [truth[tuple(p)][:15] for p in PROMPTS]
    assert spec.metrics.accepted_tokens > spec.metrics.drafted_tokens // 2
    assert spec.stats()["tokens_per_step"] > 2
    assert spec.block_manager.num_free == spec.block_manager.num_blocks


def test_filters_work_row_by_row():
    from nanoseek.serve.sampling import filter_logits

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 30.0]])
    out = filter_logits(logits, SamplingParams(top_k=2, top_p=0.99, min_p=0.01))
    assert torch.isinf(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()
    assert torch.isfinite(out[1, 3]) and torch.isinf(out[1, :3]).all()


def test_requests_larger_than_the_cache_are_refused_up_front(model):
    small = engine(model, cache_memory_mb=4 * CacheSpec.for_model(model.cfg, torch.float32).bytes_per_token * 4 / 2**20)
    with pytest.raises(ValueError, match="more KV cache"):
        small.add_request(list(range(1, 20)), GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        small.add_request([1, 10_000], GREEDY)


def test_a_vanishing_temperature_samples_the_argmax_instead_of_failing():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1e-300)
    assert sample_token(logits, params, torch.Generator().manual_seed(0), [], []).token == int(logits.argmax())


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token():
    """top_p=1e-300 is 0 in float32: it used to mask every token and crash torch.multinomial."""
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_p=1e-300)
    for seed in range(5):
        picked = sample_token(logits, params, torch.Generator().manual_seed(seed), [], [])
        assert picked.token == int(logits.argmax())


def test_a_request_that_fails_fails_alone_and_the_others_keep_their_tokens(model):
    clean = engine(model).generate(PROMPTS, GREEDY)
    eng = engine(model)
    ids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    # More alternatives than the vocabulary has: the batched sampler's topk fails for this row alone.
    bad = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=10, temperature=1.0, logprobs=10**6))
    outputs = {}
    while eng.has_unfinished():
        outputs |= {out.request_id: out for out in eng.step()}
    assert [outputs[i].token_ids for i in ids] == [o.token_ids for o in clean]
    failed = outputs[bad]
    assert failed.finish_reason == "error" and "RuntimeError" in failed.error
    assert eng.block_manager.num_free == eng.block_manager.num_blocks


def test_a_captured_decode_step_gives_the_eager_tokens(model):
    """torch.compile of the decode pass against the eager engine, greedy, with the context growing past the
    first compilation's length: one graph serves every length (a batch of three on a CPU: dynamic)."""
    from torch._dynamo.utils import counters

    prompts = [list(range(1, 10)), list(range(5, 32, 3)), [7] * 9]  # prefilled together, then decoded together
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    eager = engine(model).generate(prompts, params)
    captured = engine(model, enforce_eager=False, max_batched_tokens=64)
    captured.generate(prompts, SamplingParams(max_tokens=2, temperature=0))  # compiles (unless a graph fits)
    compiled = counters["frames"]["ok"]
    assert [o.token_ids for o in captured.generate(prompts, params)] == [o.token_ids for o in eager]
    assert counters["frames"]["ok"] == compiled  # no recompilation as the context grew past the first
    assert captured.block_manager.num_free == captured.block_manager.num_blocks


def test_a_captured_cpu_step_of_many_rows_reads_each_pairs_expert_where_it_lies(model):
    """On a CPU a captured step takes the gathered path (each (token, expert) pair's products one fused
    reduction) at any batch, past 4 pairs per expert too: the eager greedy tokens. FP8-resident experts, whose
    per-pair conversion has no vector instruction there, and CUDA keep it to fewer pairs than experts."""
    prompts = [[1 + i, 2 + i, 3 + 2 * i, 5] for i in range(20)]  # 20 rows x 2 experts > 4 x 8 experts
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    eager = engine(model).generate(prompts, params)
    captured = engine(model, enforce_eager=False, max_batched_tokens=128)
    assert [o.token_ids for o in captured.generate(prompts, params)] == [o.token_ids for o in eager]
    experts = next(m for m in captured.model.modules() if isinstance(m, RoutedExperts))
    cpu, cuda, pairs = torch.device("cpu"), torch.device("cuda"), 40 * experts.n_experts
    assert experts._gathered_pays(pairs, cpu) and experts.captured_paths(2, 64, cpu) == {64}
    assert not experts._gathered_pays(pairs, cuda) and experts._gathered_pays(experts.n_experts, cuda)
    fp8 = copy.copy(experts)  # (the model is the module's fixture)
    fp8.quantized = "fp8"
    assert not fp8._gathered_pays(pairs, cpu) and fp8._gathered_pays(experts.n_experts, cpu)


@pytest.mark.parametrize("k", [1, 2])
def test_captured_mtp_drafting_and_verifying_give_the_eager_greedy_tokens(model, k):
    """Speculative decoding with its verifying step and the MTP module's steps captured: the tokens of plain
    eager greedy decoding, as the batch shrinks (requests of different lengths) and drafts are accepted or not."""
    prompts = [list(range(1, 10)), list(range(5, 32, 3)), [7] * 9, [3, 1, 4, 1, 5]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (14, 5, 9, 1)]
    eager = engine(model).generate(prompts, params)
    captured = engine(model, enforce_eager=False, speculative_tokens=k, max_batched_tokens=64)
    assert [o.token_ids for o in captured.generate(prompts, params)] == [o.token_ids for o in eager]
    assert captured.metrics.drafted_tokens > 0
    assert captured.block_manager.num_free == captured.block_manager.num_blocks


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"weights": "int4"}, "auto, fp8, int8, bf16, fp32"), ({"max_seqs": 0}, "--max-seqs"), ({"bogus": 1}, "bogus")],
)
def test_engine_settings_made_in_python_are_checked_as_the_flags_are(model, setting, message):
    with pytest.raises((ValueError, TypeError), match=message):
        engine(model, **setting)
