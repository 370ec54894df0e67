"""Model arithmetic from a config alone (no weights): parameters, KV-cache bytes, FLOPs per token, and
what training and serving cost on rented GPUs.

    nanoseek cost --preset v3-671b --tokens 14.8T --gpu h800      # GPU-hours and dollars at an MFU
    nanoseek cost --preset v3-671b --v3-report                    # DeepSeek-V3's published budget, rebuilt
    nanoseek cost --serving-report [--json]                       # DeepSeek's serving day and margin, rebuilt

Counts follow the V3 paper's convention: the main model without the MTP modules (671B total, 37B
activated per token for DeepSeek-V3). The balancing bias is a buffer, not a parameter. Training FLOPs
per token are 3x the forward pass (forward + backward): 2 x every activated weight used in a matmul
(the embedding lookup is not one; the output head is), plus causal attention, H x (d_qk + d_v) x seq
per layer and token, plus the MTP modules. MFU is measured against the GPU's dense BF16 peak, the
usual convention, whatever precision the GEMMs run in.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

from nanoseek.config import PRESETS, ModelConfig, ModelSource, get_preset
from nanoseek.flags import flag


def attention_params(cfg: ModelConfig) -> int:
    h, n = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q = h * n * cfg.qk_head_dim
    else:
        q = h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * n * cfg.qk_head_dim
    kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + n * cfg.v_head_dim * h


def expert_params(cfg: ModelConfig) -> int:
    """One routed (or shared) SwiGLU expert."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def layer_params(cfg: ModelConfig, layer_idx: int) -> tuple[int, int]:
    """(total, activated per token) for one decoder block."""
    base = attention_params(cfg) + 2 * cfg.hidden_size  # + input and post-attention norms
    if not cfg.is_moe_layer(layer_idx):
        dense = base + 3 * cfg.hidden_size * cfg.intermediate_size
        return dense, dense
    shared = base + cfg.n_routed_experts * cfg.hidden_size + cfg.n_shared_experts * expert_params(cfg)
    return (shared + cfg.n_routed_experts * expert_params(cfg), shared + cfg.num_experts_per_tok * expert_params(cfg))


@dataclass(slots=True)
class ModelStats:
    params_total: int
    params_active: int
    params_mtp: int  # the MTP modules' own weights (they share the embedding and head)
    kv_bytes_per_token: int  # MLA latent cache, all layers
    kv_bytes_per_token_mha: int  # the same model with full multi-head K/V
    kv_dtype_bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2, attention: str = "mla", kv_heads: int = 8) -> int:
    """Bytes cached per token over all layers: MLA keeps the latent plus the shared RoPE key; MHA keeps
    full keys (nope + rope) and values for every head; GQA the same for kv_heads shared heads."""
    if attention == "mla":
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    elif attention == "mha":
        per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    elif attention == "gqa":
        per_layer = min(kv_heads, cfg.num_attention_heads) * (cfg.qk_head_dim + cfg.v_head_dim)
    else:
        raise ValueError(f"attention must be 'mla', 'mha' or 'gqa', got {attention!r}")
    return per_layer * cfg.num_hidden_layers * dtype_bytes


def moe_layer_count(cfg: ModelConfig) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


def all_to_all_bytes_per_token(cfg: ModelConfig, ep: int, dispatch_bytes: float = 2, combine_bytes: float = 2) -> float:
    """Bytes one token sends to other ranks in a forward pass of the main model under expert parallelism.

    Each MoE layer sends the token's hidden state once per routed expert (K copies), and with uniform
    routing a fraction (ep - 1) / ep of the experts live elsewhere; the outputs come back the same way
    (combine). The backward pass moves the same bytes again. DeepSeek-V3 dispatches in FP8 (1 byte plus a
    4-byte scale per 128 channels) and combines in BF16: dispatch_bytes=1 + 4/128, combine_bytes=2.
    """
    if ep < 1 or (cfg.n_routed_experts and cfg.n_routed_experts % ep):
        raise ValueError(f"ep={ep} must be >= 1 and divide n_routed_experts={cfg.n_routed_experts}")
    remote = (ep - 1) / ep
    per_layer = cfg.num_experts_per_tok * cfg.hidden_size * remote * (dispatch_bytes + combine_bytes)
    return moe_layer_count(cfg) * per_layer


def model_stats(cfg: ModelConfig, dtype_bytes: int = 2) -> ModelStats:
    h, v = cfg.hidden_size, cfg.vocab_size
    outer = v * h * (1 if cfg.tie_word_embeddings else 2) + h  # embedding, head, final norm
    layers = [layer_params(cfg, i) for i in range(cfg.num_hidden_layers)]
    mtp = sum(
        layer_params(cfg, cfg.num_hidden_layers + k)[0] + 2 * h * h + 3 * h  # eh_proj; enorm, hnorm, head norm
        for k in range(cfg.num_nextn_predict_layers)
    )
    return ModelStats(
        params_total=outer + sum(t for t, _ in layers),
        params_active=outer + sum(a for _, a in layers),
        params_mtp=mtp,
        kv_bytes_per_token=kv_bytes_per_token(cfg, dtype_bytes, "mla"),
        kv_bytes_per_token_mha=kv_bytes_per_token(cfg, dtype_bytes, "mha"),
        kv_dtype_bytes=dtype_bytes,
    )


# --- FLOPs, GPU-hours and money ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GPU:
    name: str
    bf16_flops: float  # dense peak, no sparsity
    fp8_flops: float | None
    memory_bytes: float
    memory_bandwidth: float  # HBM bytes/s
    nvlink_bandwidth: float = 0.0  # NVIDIA's NVLink figure per GPU, bytes/s
    ib_bandwidth: float = 0.0  # the GPU's own scale-out NIC, bytes/s (400 Gb/s ConnectX-7: 50 GB/s)


GPUS = {  # NVIDIA's datasheet peaks (SXM parts); the H800 is an H100 with its NVLink cut to 400 GB/s
    "h800": GPU("H800 SXM", 989.4e12, 1978.9e12, 80e9, 3.35e12, 400e9, 50e9),
    "h100": GPU("H100 SXM", 989.4e12, 1978.9e12, 80e9, 3.35e12, 900e9, 50e9),
    "h200": GPU("H200 SXM", 989.4e12, 1978.9e12, 141e9, 4.8e12, 900e9, 50e9),
    "a100": GPU("A100 SXM 80GB", 312e12, None, 80e9, 2.039e12, 600e9, 25e9),
}
V3_DECODE_TOKENS_PER_NODE = 14.8e3  # DeepSeek's production figure: output tokens/s per H800 node (Feb 2025)


@dataclass(slots=True)
class Flops:
    """FLOPs per token, split by where they go."""

    matmul: float
    attention: float
    mtp: float
    training: bool

    @property
    def total(self) -> float:
        return self.matmul + self.attention + self.mtp


def flops_per_token(cfg: ModelConfig, seq_len: float, training: bool = True, mtp: bool = True) -> Flops:
    """FLOPs for one token of a sequence of seq_len (causal attention sees seq_len / 2 keys on average)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    stats = model_stats(cfg)
    matmul_params = stats.params_active - (0 if cfg.tie_word_embeddings else v * h)  # the lookup is no matmul
    attention = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len  # 2 x H x d x seq / 2
    depth = cfg.num_nextn_predict_layers if mtp else 0
    mtp_block = layer_params(cfg, cfg.num_hidden_layers)[1] + 2 * h * h + v * h  # block, eh_proj, shared head
    scale = 3 if training else 1
    return Flops(
        scale * 2 * matmul_params,
        scale * cfg.num_hidden_layers * attention,
        scale * depth * (2 * mtp_block + attention),
        training,
    )


def parse_count(text: str | float) -> float:
    """'14.8T', '61.4B', '500M', '2k' or a plain number."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    text = text.strip().lower()
    try:
        return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise ValueError(f"not a count: {text!r} (use e.g. 14.8T, 61.4B, 500M)") from None


def gpu_hours(total_flops: float, gpu: GPU, mfu: float) -> float:
    return total_flops / (gpu.bf16_flops * mfu) / 3600


# DeepSeek-V3 technical report, Table 1 and Sec. 4: pretraining on 14.8T tokens at 4K, then two
# context-extension phases of 1000 steps each (32K x 1920 sequences, 128K x 480 sequences).
V3_PHASES = (
    ("pre-training", 14.8e12, 4096),
    ("context extension 32K", 1000 * 1920 * 32768, 32768),
    ("context extension 128K", 1000 * 480 * 131072, 131072),
)
V3_REPORTED_HOURS = {"pre-training": 2664e3, "context extension": 119e3, "post-training": 5e3, "total": 2788e3}


def v3_implied_mfu(cfg: ModelConfig) -> float:
    """The MFU (of H800 BF16 peak) at which our FLOPs reproduce V3's 2,664K pre-training GPU-hours."""
    _, tokens, seq = V3_PHASES[0]
    return (
        flops_per_token(cfg, seq).total * tokens / (V3_REPORTED_HOURS["pre-training"] * 3600 * GPUS["h800"].bf16_flops)
    )


@dataclass(slots=True)
class Serving:
    weight_bytes: float
    kv_bytes_per_token: dict[str, int]  # mla, mha, gqa
    contexts_per_node: dict[str, int]  # at context_len, on gpus_per_node GPUs, after the weights
    context_len: int
    gpus_per_node: int
    kv_tokens: int  # MLA-cached tokens that fit beside the weights


FP8_BYTES_PER_PARAM = 1 + 4 / (128 * 128)  # E4M3 weights with one fp32 scale per 128x128 block


@dataclass(slots=True)
class DecodeBound:
    batch: int
    bytes_per_step: float  # weights touched + the batch's latent caches read, per decode step
    tokens_per_s: float  # the node's HBM bandwidth over those bytes, times the batch


def decode_bandwidth_bound(
    cfg: ModelConfig,
    gpu: GPU,
    gpus: int,
    context_len: int,
    batches: tuple[int, ...] = (1, 8, 32, 64, 128, 256),
    weight_bytes_per_param: float = FP8_BYTES_PER_PARAM,
    kv_dtype_bytes: int = 2,
) -> list[DecodeBound]:
    """An upper bound on decode tokens/s for a node of `gpus` GPUs: a decode step reads its bytes
    (decode_step_bytes: the weights it uses once and each sequence's latent cache at context_len) at the
    GPUs' summed HBM bandwidth (weights sharded over them).
    Compute, communication and MTP's extra tokens per step are left out: a bound, not a forecast."""
    out = []
    for b in batches:
        step = decode_step_bytes(cfg, b, context_len, weight_bytes_per_param, kv_dtype_bytes)
        out.append(DecodeBound(b, step, b * gpus * gpu.memory_bandwidth / step))
    return out


def decode_step_bytes(
    cfg: ModelConfig, batch: int, context_len: int, weight_bytes_per_param: float, kv_dtype_bytes: int = 2
) -> float:
    """Bytes one decode step of `batch` sequences reads: every weight it uses once (of the routed experts, those
    that at least one token chose: E (1 - (1 - k/E)^B) per MoE layer under balanced routing; the embedding is a
    lookup) and each sequence's latent cache at context_len."""
    stats, routed = model_stats(cfg), cfg.n_routed_experts * expert_params(cfg) * moe_layer_count(cfg)
    always = stats.params_total - routed - cfg.vocab_size * cfg.hidden_size
    chosen = 1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** batch if cfg.n_routed_experts else 0
    kv = kv_bytes_per_token(cfg, kv_dtype_bytes, "mla")
    return (always + routed * chosen) * weight_bytes_per_param + batch * context_len * kv


def serving_footprint(
    cfg: ModelConfig,
    gpu: GPU,
    context_len: int = 32768,
    gpus_per_node: int = 8,
    weight_bytes_per_param: float = FP8_BYTES_PER_PARAM,
    kv_dtype_bytes: int = 2,
) -> Serving:
    """Weights (default FP8 with one fp32 scale per 128x128 block, as DeepSeek ships V3) and how many
    contexts of context_len fit in the rest of a node's memory, per attention kind."""
    stats = model_stats(cfg)
    weights = (stats.params_total + stats.params_mtp) * weight_bytes_per_param
    kv = {kind: kv_bytes_per_token(cfg, kv_dtype_bytes, kind) for kind in ("mla", "gqa", "mha")}
    free = gpus_per_node * gpu.memory_bytes - weights
    contexts = {kind: max(0, int(free // (b * context_len))) for kind, b in kv.items()}
    return Serving(weights, kv, contexts, context_len, gpus_per_node, max(0, int(free // kv["mla"])))


def cost_report(
    cfg: ModelConfig,
    gpu: GPU,
    tokens: float = 14.8e12,
    seq_len: int = 4096,
    mfu: float | None = None,
    v3_report: bool = False,
    price_per_gpu_hour: float = 2.0,
    weights: str = "fp8",
    context_len: int = 32768,
    gpus_per_node: int = 8,
) -> dict[str, Any]:
    """`nanoseek cost` as data: training GPU-hours and dollars per phase (DeepSeek-V3's own phases with
    v3_report), and serving: weights, KV tokens that fit, and the decode bandwidth bound."""
    stats = model_stats(cfg)
    implied = mfu is None
    mfu = v3_implied_mfu(get_preset("v3-671b")) if implied else mfu
    if not 0 < mfu <= 1:
        raise ValueError("--mfu must lie in (0, 1]")
    if weights not in ("fp8", "bf16"):
        raise ValueError("--weights must be fp8 or bf16")
    phases = list(V3_PHASES) if v3_report else [("training", tokens, seq_len)]
    rows = []
    for name, phase_tokens, seq in phases:
        per_token = flops_per_token(cfg, seq).total
        hours = gpu_hours(per_token * phase_tokens, gpu, mfu)
        rows.append(
            {
                "phase": name,
                "tokens": phase_tokens,
                "seq_len": seq,
                "flops_per_token": per_token,
                "gpu_hours": hours,
                "dollars": hours * price_per_gpu_hour,
            }
        )
    post = V3_REPORTED_HOURS["post-training"] if v3_report else 0.0
    total_hours = sum(r["gpu_hours"] for r in rows) + post
    per_param = FP8_BYTES_PER_PARAM if weights == "fp8" else 2
    serving = serving_footprint(cfg, gpu, context_len, gpus_per_node, weight_bytes_per_param=per_param)
    bounds = decode_bandwidth_bound(cfg, gpu, gpus_per_node, context_len, weight_bytes_per_param=per_param)
    report = {
        "params_total": stats.params_total,
        "params_active": stats.params_active,
        "params_mtp": stats.params_mtp,
        "gpu": gpu.name,
        "gpu_bf16_flops": gpu.bf16_flops,
        "mfu": mfu,
        "mfu_implied_by_v3": implied,
        "price_per_gpu_hour": price_per_gpu_hour,
        "phases": rows,
        "post_training_gpu_hours": post,
        "total_gpu_hours": total_hours,
        "total_dollars": total_hours * price_per_gpu_hour,
        "inference": {
            "flops_per_token": flops_per_token(cfg, context_len, training=False, mtp=False).total,
            "weight_bytes": serving.weight_bytes,
            "kv_bytes_per_token": serving.kv_bytes_per_token,
            "context_len": serving.context_len,
            "gpus_per_node": serving.gpus_per_node,
            "contexts_per_node": serving.contexts_per_node,
            "weights": weights,
            "weight_bytes_per_gpu": serving.weight_bytes / serving.gpus_per_node,
            "weights_fit": serving.weight_bytes <= serving.gpus_per_node * gpu.memory_bytes,
            "kv_tokens_per_node": serving.kv_tokens,
            "decode_bound": [
                {"batch": b.batch, "bytes_per_step": b.bytes_per_step, "tokens_per_s": b.tokens_per_s} for b in bounds
            ],
            "deepseek_decode_tokens_per_h800_node": V3_DECODE_TOKENS_PER_NODE,
        },
    }
    if v3_report:
        report["reported_gpu_hours"] = V3_REPORTED_HOURS["total"]
    return report


def human(n: float, unit: str = "") -> str:
    """1.23T, 4.56B, 7.89M, 1.00K: counts as people read them."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def format_cost_report(report: dict[str, Any], name: str) -> str:
    """`cost_report` (with its "api" part) as the text `nanoseek cost` prints."""
    r, inf, api = report, report["inference"], report["api"]
    implied = " (DeepSeek-V3's own, implied by its report)" if r["mfu_implied_by_v3"] else ""
    lines = [
        f"{name}: {human(r['params_total'])} parameters, {human(r['params_active'])} active per token, MTP "
        f"{human(r['params_mtp'])}",
        f"training on {r['gpu']} at {r['mfu']:.1%} MFU of its {r['gpu_bf16_flops'] / 1e12:.0f} TFLOP/s BF16 "
        f"peak{implied}:",
    ]
    for p in r["phases"]:
        lines.append(
            f"  {p['phase']:<23} {human(p['tokens']):>7} tokens @ {p['seq_len']:>6}: "
            f"{p['flops_per_token']:9.3g} FLOP/token  {human(p['gpu_hours']):>8} GPU-h  ${human(p['dollars'])}"
        )
    if r["post_training_gpu_hours"]:
        lines.append(f"  {'post-training':<23} as reported: {human(r['post_training_gpu_hours'])} GPU-h")
    lines.append(
        f"  total {human(r['total_gpu_hours'])} GPU-hours, ${human(r['total_dollars'])} at "
        f"${r['price_per_gpu_hour']}/GPU-hour"
    )
    if "reported_gpu_hours" in r:
        reported = r["reported_gpu_hours"]
        lines.append(
            f"  DeepSeek-V3 reports {human(reported)} GPU-hours (${human(reported * 2)} at $2): "
            f"{r['total_gpu_hours'] / reported - 1:+.1%}"
        )
    kv, node = inf["kv_bytes_per_token"], f"{inf['gpus_per_node']} x {r['gpu']}"
    kind = "FP8 + block scales" if inf["weights"] == "fp8" else "bf16"
    lines.append(
        f"serving: weights {inf['weight_bytes'] / 1e9:.3g} GB ({kind}), {inf['weight_bytes_per_gpu'] / 1e9:.3g} "
        f"GB per GPU on {inf['gpus_per_node']}; KV bytes/token MLA {kv['mla']:,} | GQA-8 {kv['gqa']:,} | "
        f"MHA {kv['mha']:,}"
    )
    if not inf["weights_fit"]:
        lines.append(f"  the weights alone exceed {node}: serve across more GPUs (--gpus-per-node)")
    else:
        fits = ", ".join(f"{k.upper()} {v:,}" for k, v in inf["contexts_per_node"].items())
        lines.append(
            f"  {inf['context_len']}-token contexts that fit {node} beside the weights: {fits} "
            f"({human(inf['kv_tokens_per_node'])} MLA-cached tokens)"
        )
        nodes = inf["gpus_per_node"] / 8
        bound = ", ".join(f"b{b['batch']} {human(b['tokens_per_s'] / nodes)}" for b in inf["decode_bound"])
        lines.append(
            f"  decode bound (HBM bandwidth, {inf['context_len']}-token contexts, batch per copy of the "
            f"model), tokens/s per 8-GPU node: {bound}; DeepSeek reports "
            f"{human(V3_DECODE_TOKENS_PER_NODE)} per H800 node in production (expert parallelism over many "
            "nodes, MTP, about 1.8 tokens per step)"
        )
    lines.append(
        f"API: {human(api['input_tokens'])} input tokens at {api['hit_rate']:.0%} cache hits + "
        f"{human(api['output_tokens'])} output tokens = {api['price']:.4f} {api['currency']}"
    )
    return "\n".join(lines)


# --- serving economics: DeepSeek's published day, and SGLang's 96 H100s, from first principles -----------------
# DeepSeek-V3/R1 Inference System Overview (deepseek-ai/open-infra-index, 202502OpenSourceWeek, day 6): V3 and R1
# on H800 nodes over the 24 hours from 2025-02-27 12:00 UTC+8.
V3_DAY = {"input_tokens": 608e9, "cache_hit_tokens": 342e9, "output_tokens": 168e9, "kv_len_per_output_token": 4989}
V3_NODES = {"mean": 226.75, "peak": 278}
R1_PRICES = {"cache_hit": 0.14, "cache_miss": 0.55, "output": 2.19}  # dollars per million tokens
SERVING_CAVEAT = (
    "DeepSeek's caveat: the $562,027 prices every token at R1's rates; actual revenue is substantially lower, since "
    "V3 is priced well below R1, only part of the service is monetised (web and app use are free), and night-time "
    "discounts apply off-peak."
)
SECONDS_PER_DAY = 86_400


def flops_by_precision(
    cfg: ModelConfig, seq_len: float, training: bool = True, mtp: bool = True
) -> tuple[float, float]:
    """flops_per_token split as DeepSeek runs it: (FP8, BF16). The linear layers' GEMMs are FP8; core attention and
    the output heads (the main one and MTP's shared one) stay BF16, as V3's FP8 recipe keeps them."""
    f = flops_per_token(cfg, seq_len, training, mtp)
    scale, depth = (3 if training else 1), (cfg.num_nextn_predict_layers if mtp else 0)
    heads = scale * 2 * cfg.vocab_size * cfg.hidden_size * (1 + depth)
    mtp_attention = scale * depth * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    bf16 = f.attention + mtp_attention + heads
    return f.total - bf16, bf16


def mla_decode_attention_flops(cfg: ModelConfig, context: float) -> float:
    """Core attention FLOPs of one decoded token in MLA's absorbed form (FlashMLA's): every head scores the cached
    latent plus RoPE key (kv_lora_rank + rope dims) and sums the latent (kv_lora_rank) over `context` keys."""
    per_key = 2 * cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return cfg.num_hidden_layers * per_key * context


def v3_precision_mfu() -> float:
    """The share of each precision's dense peak (FP8 for the GEMMs, BF16 for attention and heads) at which our FLOPs
    reproduce DeepSeek-V3's 2,664K H800 pre-training GPU-hours: the serving model's one calibration, taken from
    training, not from the serving figures it is checked against."""
    _, tokens, seq = V3_PHASES[0]
    fp8, bf16 = flops_by_precision(get_preset("v3-671b"), seq)
    h800 = GPUS["h800"]
    gpu_seconds_per_token = V3_REPORTED_HOURS["pre-training"] * 3600 / tokens
    return (fp8 / h800.fp8_flops + bf16 / h800.bf16_flops) / gpu_seconds_per_token


def mean_prompt_len(kv_len_per_output_token: float, input_tokens: float, output_tokens: float) -> float:
    """The mean prompt P if every request were alike: P / O is the day's input / output tokens, and an output token
    attends to P + O / 2 keys on average, which DeepSeek reports (4,989)."""
    ratio = input_tokens / output_tokens
    return kv_len_per_output_token * ratio / (ratio + 0.5)


@dataclass(frozen=True, slots=True)
class Layout:
    """A prefill-decode disaggregated deployment: hardware, parallelism, workload, and what its operators published.
    Routed experts are spread over every GPU of a unit (EP), attention and shared experts are data-parallel (DP)."""

    name: str
    source: str
    gpu: str  # a GPUS key
    prefill_nodes: int  # one prefill unit
    decode_nodes: int  # one decode unit
    prompt_len: float  # mean prompt tokens per request
    hit_rate: float  # share of input tokens found in the KV cache: loaded, not computed
    decode_context: float  # mean KV length a decoded token attends to
    decode_batch: int | None  # sequences per GPU; None: the largest that keeps user_tokens_per_s
    user_tokens_per_s: float
    published: dict[str, float] = field(default_factory=dict)
    redundant_experts: int = 32  # EPLB's extra copies of hot experts, both phases
    gpus_per_node: int = 8

    def describe(self) -> str:
        gpu, g = GPUS[self.gpu].name, self.gpus_per_node
        return (
            f"{gpu}; prefill {self.prefill_nodes} nodes (EP{self.prefill_nodes * g}, DP attention), decode "
            f"{self.decode_nodes} nodes (EP{self.decode_nodes * g}); {self.redundant_experts} redundant experts"
        )


DEEPSEEK_DAY6 = Layout(
    name="DeepSeek-V3/R1 online service, 24 h from 2025-02-27 12:00 UTC+8",
    source="deepseek-ai/open-infra-index 202502OpenSourceWeek day 6, DeepSeek-V3/R1 Inference System Overview",
    gpu="h800",
    prefill_nodes=4,
    decode_nodes=18,
    prompt_len=mean_prompt_len(V3_DAY["kv_len_per_output_token"], V3_DAY["input_tokens"], V3_DAY["output_tokens"]),
    hit_rate=V3_DAY["cache_hit_tokens"] / V3_DAY["input_tokens"],
    decode_context=V3_DAY["kv_len_per_output_token"],
    decode_batch=None,
    user_tokens_per_s=20.0,  # the low end of the published 20-22 tokens/s per user
    published={
        "prefill": 73.7e3,
        "decode": V3_DECODE_TOKENS_PER_NODE,
        "mean_nodes": V3_NODES["mean"],
        "peak_nodes": V3_NODES["peak"],
        "cost": 87_072,
        "revenue": 562_027,
        "margin": 5.45,
    },
)
# lmsys.org/blog/2025-05-05-large-scale-ep: 12 nodes x 8 H100 serving DeepSeek-V3; each phase measured alone with
# the other unconstrained, prefill on 4 nodes (EP32) with 2,000-token prompts, decode on 9 nodes (EP72) at 256
# sequences per GPU and a 2,000-token KV cache, without MTP.
SGLANG_96_H100 = Layout(
    name="SGLang on 96 H100s (lmsys, 2025-05-05; each phase measured alone, the other unconstrained)",
    source="lmsys.org/blog/2025-05-05-large-scale-ep (PD disaggregation, DeepEP, two-batch overlap)",
    gpu="h100",
    prefill_nodes=4,
    decode_nodes=9,
    prompt_len=2000,
    hit_rate=0.0,
    decode_context=2000,
    decode_batch=256,
    user_tokens_per_s=0.0,
    published={"prefill": 52.3e3, "decode": 22.3e3, "cost_per_million_output": 0.20},
)


@dataclass(slots=True)
class ServingAssumptions:
    """What the serving model assumes beyond each layout's published facts; change any field."""

    prefill_mfu: float | None = None  # share of each precision's peak while prefilling; None: v3_precision_mfu()
    decode_mfu: float | None = None  # the same while decoding
    hbm_efficiency: float = 0.9  # FlashMLA reads 3,000 of the H800's 3,350 GB/s
    ib_efficiency: float = 0.8  # DeepEP's low-latency kernels: 39-46 GB/s of the NIC's 50 at EP64-256
    nvlink_efficiency: float = 0.4  # DeepEP forwards ~160 GB/s over the H800's 400 GB/s NVLink
    overlap: bool = True  # two micro-batches hide one's all-to-all behind the other's compute: max, not sum
    dispatch_bytes: float = 1 + 4 / 128  # FP8 with one fp32 scale per 128 channels
    combine_bytes: float = 2.0  # BF16
    kv_bytes: int = 2  # BF16 latent cache: DeepSeek runs core MLA in BF16
    weight_bytes: float = FP8_BYTES_PER_PARAM
    mtp_acceptance: float = 0.0  # the overview does not mention MTP; V3's paper measures 0.85-0.9 acceptance
    memory_reserve: float = 0.1  # share of HBM kept for activations, communication buffers, CUDA graphs
    price_per_gpu_hour: float = 2.0  # DeepSeek's own figure
    peak_to_mean_nodes: float = V3_NODES["peak"] / V3_NODES["mean"]  # the day's load curve, DeepSeek's

    def mfu(self, phase: str) -> float:
        value = self.prefill_mfu if phase == "prefill" else self.decode_mfu
        return v3_precision_mfu() if value is None else value


def expert_slots_per_gpu(cfg: ModelConfig, gpus: int, redundant: int) -> int:
    return -(-(cfg.n_routed_experts + redundant) // gpus)


def compute_seconds(fp8: float, bf16: float, gpu: GPU, mfu: float) -> float:
    return (fp8 / (gpu.fp8_flops or gpu.bf16_flops) + bf16 / gpu.bf16_flops) / mfu


def link_bytes_per_token(
    cfg: ModelConfig, a: ServingAssumptions, nodes: int, gpus_per_node: int, forward: bool
) -> tuple[float, float]:
    """(InfiniBand, NVLink) bytes one token's dispatch and combine send in a forward pass, routing uniform.
    forward (DeepEP's normal kernels, prefill): one copy crosses IB per other node among the token's experts and
    NVLink fans it out there; otherwise (its low-latency kernels, decode: pure RDMA) every (token, expert) pair on
    another GPU crosses the NIC."""
    copy = moe_layer_count(cfg) * cfg.hidden_size * (a.dispatch_bytes + a.combine_bytes)
    k = cfg.num_experts_per_tok
    if not forward:
        gpus = nodes * gpus_per_node
        return k * (gpus - 1) / gpus * copy, 0.0
    other_nodes = (nodes - 1) * (1 - (1 - 1 / nodes) ** k)  # expected distinct other nodes among k experts
    return other_nodes * copy, k * (gpus_per_node - 1) / gpus_per_node * copy


def link_seconds(ib: float, nvlink: float, gpu: GPU, a: ServingAssumptions) -> float:
    """IB and NVLink carry their shares at once: the slower one sets the time."""
    ib_s = ib / (gpu.ib_bandwidth * a.ib_efficiency) if ib else 0.0
    return max(ib_s, nvlink / (gpu.nvlink_bandwidth * a.nvlink_efficiency) if nvlink else 0.0)


def overlapped(compute: float, comm: float, overlap: bool) -> float:
    return max(compute, comm) if overlap else compute + comm


@dataclass(slots=True)
class Prefill:
    experts_per_gpu: int
    compute_s: float  # one computed token on one GPU
    comm_s: float  # its dispatch and combine
    computed_per_node: float  # tokens/s that missed the cache
    input_per_node: float  # all input tokens/s, cache hits included


def prefill_throughput(cfg: ModelConfig, layout: Layout, a: ServingAssumptions) -> Prefill:
    gpu = GPUS[layout.gpu]
    # A hit is a prompt's head, so the computed tail sits at positions hit_rate * P .. P and attends to
    # (1 + hit_rate) * P / 2 keys on average; flops_per_token takes twice the mean keys as its seq_len.
    fp8, bf16 = flops_by_precision(cfg, layout.prompt_len * (1 + layout.hit_rate), training=False, mtp=False)
    # A prefill needs logits at each prompt's last position only (they sample its first output token): one pass
    # of the head per prompt, not per computed token (4% of a 2K prompt's FLOP time).
    tail = layout.prompt_len * (1 - layout.hit_rate)
    bf16 -= 2 * cfg.vocab_size * cfg.hidden_size * (1 - 1 / tail)
    compute = compute_seconds(fp8, bf16, gpu, a.mfu("prefill"))
    comm = link_seconds(*link_bytes_per_token(cfg, a, layout.prefill_nodes, layout.gpus_per_node, True), gpu, a)
    computed = layout.gpus_per_node / overlapped(compute, comm, a.overlap)
    slots = expert_slots_per_gpu(cfg, layout.prefill_nodes * layout.gpus_per_node, layout.redundant_experts)
    return Prefill(slots, compute, comm, computed, computed / (1 - layout.hit_rate))


@dataclass(slots=True)
class Decode:
    experts_per_gpu: int
    batch: int  # sequences per GPU
    max_batch: int  # what HBM holds beside the weights at decode_context
    weight_bytes: float  # per GPU: everything but the routed experts, plus its own expert slots
    compute_s: float  # one step on one GPU
    memory_s: float
    comm_s: float
    step_s: float
    user_tokens_per_s: float
    output_per_node: float


def decode_step(cfg: ModelConfig, layout: Layout, a: ServingAssumptions, batch: int) -> Decode:
    """One decode step of `batch` sequences on one GPU. Attention, dense layers and shared experts are replicated
    (DP), so each GPU reads them whole plus its routed-expert slots and its sequences' latent caches; balanced
    routing (EPLB) gives every GPU the expert work of as many tokens as it feeds in."""
    gpu, gpus = GPUS[layout.gpu], layout.decode_nodes * layout.gpus_per_node
    slots = expert_slots_per_gpu(cfg, gpus, layout.redundant_experts)
    forwarded = batch * (2 if a.mtp_acceptance else 1)  # with MTP each sequence also verifies one draft
    fp8, bf16 = flops_by_precision(cfg, 0, training=False, mtp=False)
    per_token = compute_seconds(
        fp8, bf16 + mla_decode_attention_flops(cfg, layout.decode_context), gpu, a.mfu("decode")
    )
    replicated = decode_step_bytes(cfg, 0, 0, 1.0)  # batch 0: every weight but the routed experts and the lookup
    weights = (replicated + slots * moe_layer_count(cfg) * expert_params(cfg)) * a.weight_bytes
    kv_per_seq = layout.decode_context * kv_bytes_per_token(cfg, a.kv_bytes, "mla")
    memory = (weights + batch * kv_per_seq) / (gpu.memory_bandwidth * a.hbm_efficiency)
    ib, nvlink = link_bytes_per_token(cfg, a, layout.decode_nodes, layout.gpus_per_node, False)
    comm = link_seconds(forwarded * ib, forwarded * nvlink, gpu, a)
    compute = forwarded * per_token
    step = overlapped(max(compute, memory), comm, a.overlap)
    accepted = 1 + a.mtp_acceptance
    max_batch = max(0, int((gpu.memory_bytes * (1 - a.memory_reserve) - weights) // kv_per_seq))
    return Decode(
        experts_per_gpu=slots,
        batch=batch,
        max_batch=max_batch,
        weight_bytes=weights,
        compute_s=compute,
        memory_s=memory,
        comm_s=comm,
        step_s=step,
        user_tokens_per_s=accepted / step,
        output_per_node=layout.gpus_per_node * batch * accepted / step,
    )


def decode_throughput(cfg: ModelConfig, layout: Layout, a: ServingAssumptions) -> Decode:
    if layout.decode_batch is not None:
        return decode_step(cfg, layout, a, layout.decode_batch)
    # The largest batch whose step still gives each user user_tokens_per_s (a step grows with its batch), within HBM.
    lo, hi = 1, max(1, decode_step(cfg, layout, a, 1).max_batch)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if decode_step(cfg, layout, a, mid).user_tokens_per_s >= layout.user_tokens_per_s:
            lo = mid
        else:
            hi = mid - 1
    return decode_step(cfg, layout, a, lo)


@dataclass(frozen=True, slots=True)
class Figure:
    key: str  # stable, for JSON readers and tests
    name: str
    derived: float
    published: float
    unit: str  # tokens/s, nodes, usd, usd/M, ratio

    @property
    def diff(self) -> float:
        return self.derived / self.published - 1

    def as_dict(self) -> dict[str, Any]:
        names = ("key", "name", "unit", "derived", "published", "diff")
        return {key: getattr(self, key) for key in names}


def node_day_cost(nodes: float, gpus_per_node: int, price_per_gpu_hour: float) -> float:
    return nodes * gpus_per_node * price_per_gpu_hour * 24


def r1_revenue(day: dict[str, float] = V3_DAY, prices: dict[str, float] = R1_PRICES) -> float:
    """A day's tokens at R1's list prices: cache hits, misses and output, dollars."""
    hits, misses = day["cache_hit_tokens"], day["input_tokens"] - day["cache_hit_tokens"]
    per_m = hits * prices["cache_hit"] + misses * prices["cache_miss"] + day["output_tokens"] * prices["output"]
    return per_m / 1e6


def phase_notes(p: Prefill, d: Decode, layout: Layout, a: ServingAssumptions) -> list[str]:
    us, ms = 1e6, 1e3
    bound = "compute" if p.compute_s >= p.comm_s else "all-to-all"
    target = "as run" if layout.decode_batch else f"the largest keeping {layout.user_tokens_per_s:g} tokens/s per user"
    notes = [
        f"prefill: {p.experts_per_gpu} routed experts per GPU; {human(p.computed_per_node)} computed tokens/s per "
        f"node, {bound}-bound ({p.compute_s * us:.0f} us compute vs {p.comm_s * us:.0f} us all-to-all per token on a "
        f"GPU); mean prompt {layout.prompt_len:,.0f} tokens, {layout.hit_rate:.1%} of them cache hits",
        f"decode: {d.experts_per_gpu} routed experts per GPU, {d.weight_bytes / 1e9:.1f} GB of weights; batch "
        f"{d.batch} per GPU ({target}; HBM holds {d.max_batch}) at {d.user_tokens_per_s:.1f} tokens/s per user; step "
        f"{d.step_s * ms:.1f} ms: compute {d.compute_s * ms:.1f}, HBM reads {d.memory_s * ms:.1f}, all-to-all "
        f"{d.comm_s * ms:.1f}",
    ]
    if p.compute_s >= p.comm_s and d.compute_s >= max(d.memory_s, d.comm_s):
        # Compute-bound phases scale with the MFU: the one at which each published throughput would be met exactly.
        implied_p = a.mfu("prefill") * layout.published["prefill"] / p.input_per_node
        implied_d = a.mfu("decode") * layout.published["decode"] / d.output_per_node
        notes.append(
            f"both phases compute-bound: the published throughputs imply MFU {implied_p:.1%} (prefill) and "
            f"about {implied_d:.1%} (decode)"
        )
    return notes


def deepseek_economics(cfg: ModelConfig, a: ServingAssumptions, layout: Layout = DEEPSEEK_DAY6) -> dict[str, Any]:
    p, d, pub = prefill_throughput(cfg, layout, a), decode_throughput(cfg, layout, a), layout.published
    prefill_nodes = V3_DAY["input_tokens"] / (SECONDS_PER_DAY * p.input_per_node)
    decode_nodes = V3_DAY["output_tokens"] / (SECONDS_PER_DAY * d.output_per_node)
    nodes = prefill_nodes + decode_nodes  # the day's tokens at the derived rates: the mean node count
    published_nodes = (
        V3_DAY["input_tokens"] / (SECONDS_PER_DAY * pub["prefill"]),
        V3_DAY["output_tokens"] / (SECONDS_PER_DAY * pub["decode"]),
    )
    cost = node_day_cost(V3_NODES["mean"], layout.gpus_per_node, a.price_per_gpu_hour)
    derived_cost = node_day_cost(nodes, layout.gpus_per_node, a.price_per_gpu_hour)
    revenue = r1_revenue()
    figures = [
        Figure(
            "prefill", "prefill input tokens/s per node (hits included)", p.input_per_node, pub["prefill"], "tokens/s"
        ),
        Figure("decode", "decode output tokens/s per node", d.output_per_node, pub["decode"], "tokens/s"),
        Figure("mean_nodes", "mean nodes for the day's tokens", nodes, pub["mean_nodes"], "nodes"),
        Figure(
            "peak_nodes",
            f"peak nodes (mean x {a.peak_to_mean_nodes:.3f})",
            nodes * a.peak_to_mean_nodes,
            pub["peak_nodes"],
            "nodes",
        ),
        Figure("cost", f"GPU cost per day, {V3_NODES['mean']} nodes", cost, pub["cost"], "usd"),
        Figure("derived_cost", "GPU cost per day, derived nodes", derived_cost, pub["cost"], "usd"),
        Figure("revenue", "revenue per day at R1 prices", revenue, pub["revenue"], "usd"),
        Figure("margin", "cost-profit margin (revenue / cost - 1)", revenue / cost - 1, pub["margin"], "ratio"),
        Figure("derived_margin", "margin at the derived nodes", revenue / derived_cost - 1, pub["margin"], "ratio"),
    ]
    notes = [
        *phase_notes(p, d, layout, a),
        f"nodes: {prefill_nodes:.1f} prefill + {decode_nodes:.1f} decode for the day's "
        f"{V3_DAY['input_tokens'] / 1e9:.0f}B input and {V3_DAY['output_tokens'] / 1e9:.0f}B output tokens; at the "
        f"published rates {published_nodes[0]:.1f} + {published_nodes[1]:.1f} = {sum(published_nodes):.1f}, so "
        f"DeepSeek's per-node rates are the day's tokens over the {V3_NODES['mean']} nodes it held",
    ]
    details = {"prefill": asdict(p), "decode": asdict(d), "prefill_nodes": prefill_nodes, "decode_nodes": decode_nodes}
    return layout_entry(layout, figures, notes, details)


def sglang_economics(cfg: ModelConfig, a: ServingAssumptions, layout: Layout = SGLANG_96_H100) -> dict[str, Any]:
    p, d, pub = prefill_throughput(cfg, layout, a), decode_throughput(cfg, layout, a), layout.published
    node_hour = layout.gpus_per_node * a.price_per_gpu_hour
    figures = [
        Figure("prefill", "prefill input tokens/s per node (2K prompts)", p.input_per_node, pub["prefill"], "tokens/s"),
        Figure("decode", "decode output tokens/s per node (2K context)", d.output_per_node, pub["decode"], "tokens/s"),
        Figure(
            "cost_per_million_output",
            f"decode cost per 1M output tokens at ${a.price_per_gpu_hour:g}/GPU-h",
            node_hour / (d.output_per_node * 3600) * 1e6,
            pub["cost_per_million_output"],
            "usd/M",
        ),
    ]
    return layout_entry(layout, figures, phase_notes(p, d, layout, a), {"prefill": asdict(p), "decode": asdict(d)})


def layout_entry(layout: Layout, figures: list[Figure], notes: list[str], details: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": layout.name,
        "source": layout.source,
        "layout": layout.describe(),
        "figures": [f.as_dict() for f in figures],
        "notes": notes,
        "details": details,
    }


def assumption_notes(a: ServingAssumptions, cfg: ModelConfig) -> list[str]:
    calibrated = "DeepSeek-V3's training utilisation (it reproduces the 2,664K H800 pre-training GPU-hours)"
    mfu = f"prefill {a.mfu('prefill'):.1%}, decode {a.mfu('decode'):.1%} of each precision's dense peak"
    kv, day = kv_bytes_per_token(cfg, a.kv_bytes, "mla"), V3_DAY
    return [
        f"MFU: {mfu} (FP8 GEMMs, BF16 core attention and heads); "
        + (calibrated if a.prefill_mfu is None and a.decode_mfu is None else "as set"),
        f"HBM at {a.hbm_efficiency:.0%} of peak (FlashMLA reads 3,000 of the H800's 3,350 GB/s); "
        f"{a.memory_reserve:.0%} of HBM kept for activations and buffers",
        f"InfiniBand at {a.ib_efficiency:.0%} of 50 GB/s per GPU (DeepEP low-latency: 39-46 GB/s at EP64-256), "
        f"NVLink at {a.nvlink_efficiency:.0%} of NVIDIA's figure (DeepEP: ~160 GB/s of the H800's 400)",
        "two micro-batches: step = max(compute, all-to-all)" if a.overlap else "no overlap: compute + all-to-all",
        f"dispatch {a.dispatch_bytes:.3f} B/element (FP8 + scales), combine {a.combine_bytes:g} (BF16); weights "
        f"{a.weight_bytes:.4f} B/param (FP8, 128x128 block scales); latent KV {a.kv_bytes} B/element ({kv:,} B/token)",
        f"MTP acceptance {a.mtp_acceptance:g}"
        + (" (the overview does not mention MTP)" if not a.mtp_acceptance else " (each step also verifies a draft)"),
        "routing uniform and balanced (EPLB) over the routed experts and their redundant copies",
        "the output head runs once per prompt in prefill (its last position samples the first token), once per "
        "token in decode",
        f"DeepSeek's requests alike: prompt / output = the day's {day['input_tokens'] / 1e9:.0f}B / "
        f"{day['output_tokens'] / 1e9:.0f}B and prompt + output / 2 = {day['kv_len_per_output_token']:,} KV per "
        f"output token, so a {DEEPSEEK_DAY6.prompt_len:,.0f}-token mean prompt; a cache hit is a prompt's head and "
        "costs no compute (its disk read and latent up-projection are left out); decode batch: the largest per GPU "
        f"that keeps {DEEPSEEK_DAY6.user_tokens_per_s:g} tokens/s per user (DeepSeek: 20-22); SGLang's "
        f"{SGLANG_96_H100.decode_batch} per GPU as run",
        f"${a.price_per_gpu_hour:g} per GPU-hour; peak / mean nodes {a.peak_to_mean_nodes:.3f} (DeepSeek's "
        f"{V3_NODES['peak']} / {V3_NODES['mean']})",
    ]


def serving_report(cfg: ModelConfig, assumptions: ServingAssumptions | None = None) -> dict[str, Any]:
    """DeepSeek's published serving day and SGLang's 96-H100 deployment, derived from the config, the GPUs'
    datasheets and the stated assumptions, each figure beside its published value."""
    a = assumptions or ServingAssumptions()
    return {
        "assumptions": asdict(a) | {"prefill_mfu": a.mfu("prefill"), "decode_mfu": a.mfu("decode")},
        "assumption_notes": assumption_notes(a, cfg),
        "layouts": [deepseek_economics(cfg, a), sglang_economics(cfg, a)],
        "caveat": SERVING_CAVEAT,
    }


def format_figure(value: float, unit: str) -> str:
    if unit == "tokens/s":
        return human(value)
    if unit == "nodes":
        return f"{value:,.2f}"
    if unit == "usd":
        return f"${value:,.0f}"
    if unit == "usd/M":
        return f"${value:.3f}"
    return f"{value:.0%}"


WIDTH = 110  # the report's notes wrap here


def format_serving_report(report: dict[str, Any], name: str) -> str:
    lines = [f"Serving economics of {name} from first principles: derived beside published"]
    for entry in report["layouts"]:
        lines += ["", entry["name"], f"  {entry['layout']}", f"  source: {entry['source']}"]
        lines.append(f"  {'figure':<50} {'derived':>10} {'published':>10} {'diff':>7}")
        for f in entry["figures"]:
            derived, published = format_figure(f["derived"], f["unit"]), format_figure(f["published"], f["unit"])
            lines.append(f"  {f['name']:<50} {derived:>10} {published:>10} {f['diff']:>+7.1%}")
        lines += [textwrap.fill(note, WIDTH, initial_indent="  ", subsequent_indent="    ") for note in entry["notes"]]
    lines += ["", "assumptions (nanoseek.cost.ServingAssumptions; change any):"]
    lines += [
        textwrap.fill(n, WIDTH, initial_indent="  - ", subsequent_indent="    ") for n in report["assumption_notes"]
    ]
    return "\n".join([*lines, "", textwrap.fill(report["caveat"], WIDTH)])


def prices_flag() -> str:
    """The API prices option of every command that prices or bills (cost, serve, ledger): one name, one default
    (DeepSeek-V3's list prices in CNY)."""
    return flag(
        "per million tokens: cache-hit,cache-miss,output (a ledger records each request's cost at the prices in "
        "force when it ran; `nanoseek ledger` uses these only to price an old ledger once)",
        default="0.5,2,8",
    )


def currency_flag() -> str:
    return flag("currency of the prices", default="CNY")


# --- the commands: `nanoseek info` and `nanoseek cost` ----------------------------------------------------
@dataclass(slots=True)
class InfoConfig(ModelSource):
    """Print model arithmetic for a preset or a Hugging Face model folder: parameters, active parameters,
    MTP modules, and KV-cache bytes per token (MLA's latent against full multi-head attention)."""

    kv_bytes: int = flag("bytes per cached element (bf16: 2)", default=2, metavar="N")
    ep: int = flag("also the all-to-all bytes per token at expert parallelism E", default=1, metavar="E")
    json: bool = flag("print one JSON object", default=False)


def print_info(cfg: InfoConfig) -> int:
    from nanoseek.device import cpu_features

    model = cfg.model_config()
    stats = model_stats(model, dtype_bytes=cfg.kv_bytes)
    a2a = all_to_all_bytes_per_token(model, cfg.ep) if cfg.ep > 1 else None
    if cfg.json:
        extra = {} if a2a is None else {"ep": cfg.ep, "all_to_all_bytes_per_token": a2a}
        print(json.dumps({"source": cfg.name, **stats.as_dict(), **extra}))
        return 0
    dense, moe = model.first_k_dense_replace, model.num_hidden_layers - model.first_k_dense_replace
    mla, mha = human(stats.kv_bytes_per_token, "B"), human(stats.kv_bytes_per_token_mha, "B")
    smaller = stats.kv_bytes_per_token_mha / stats.kv_bytes_per_token
    rows = [
        ("model", cfg.model or f"preset {cfg.name}"),
        ("layers", f"{model.num_hidden_layers} ({dense} dense, {moe} MoE), hidden {model.hidden_size}"),
        (
            "experts",
            f"{model.n_routed_experts} routed (top-{model.num_experts_per_tok}) + {model.n_shared_experts} shared",
        ),
        ("parameters", f"{human(stats.params_total)} ({stats.params_total:,})"),
        ("active per token", f"{human(stats.params_active)} ({stats.params_active:,})"),
        ("MTP modules", f"{human(stats.params_mtp)} ({model.num_nextn_predict_layers} depth)"),
        (f"KV cache / token ({cfg.kv_bytes} B/elem)", f"MLA {mla} vs MHA {mha} ({smaller:.1f}x smaller)"),
    ]
    if a2a is not None:
        rows.append((f"all-to-all / token (EP={cfg.ep})", f"{human(a2a, 'B')} forward (bf16), as much again backward"))
    rows.append(("this CPU", cpu_features()))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{key:<{width}}  {value}" for key, value in rows))
    return 0


@dataclass(slots=True)
class CostConfig(ModelSource):
    """Training cost from a config: FLOPs per token (MLA attention, activated MoE weights, MTP), GPU-hours
    and money at an MFU; serving: weight bytes, latent KV bytes per token, contexts per node; the API
    price of a workload at a cache-hit rate; and (--serving-report) DeepSeek's published serving economics."""

    preset: str | None = flag("a built-in config (default: v3-671b)", default=None, choices=sorted(PRESETS))
    default_preset = "v3-671b"
    tokens: str = flag("training tokens", default="14.8T")
    seq_len: int = flag("training sequence length", default=4096)
    gpu: str = flag("the GPU", default="h800", choices=sorted(GPUS))
    mfu: float | None = flag("model FLOPs utilisation of BF16 peak (default: V3's implied)", default=None)
    price_per_gpu_hour: float = flag("rental, dollars (V3's figure)", default=2.0)
    v3_report: bool = flag(
        "DeepSeek-V3's phases (pre-training, 32K and 128K context extension) against its reported 2,788K GPU-hours",
        default=False,
    )
    context_len: int = flag("serving context length", default=32768)
    gpus_per_node: int = flag("GPUs serving one copy of the model (one node)", default=8)
    weights: str = flag(
        "serving weights: fp8 with 128x128 block scales (DeepSeek's) or bf16", default="fp8", choices=["fp8", "bf16"]
    )
    input_tokens: str = flag("API workload input tokens", default="1M")
    output_tokens: str = flag("API workload output tokens", default="1M")
    hit_rate: float = flag("share of input tokens that hit the cache", default=0.5)
    prices: str = prices_flag()
    currency: str = currency_flag()
    serving_report: bool = flag(
        "DeepSeek's published serving day (V3/R1 on H800s, Feb 2025: throughput, nodes, cost, margin) and SGLang's "
        "96-H100 deployment, derived from first principles beside the published figures",
        default=False,
    )
    json: bool = flag("print one JSON object", default=False)


def print_cost(cfg: CostConfig) -> int:
    from nanoseek.serve.prices import PriceTable

    if cfg.serving_report:
        report = serving_report(cfg.model_config(), ServingAssumptions(price_per_gpu_hour=cfg.price_per_gpu_hour))
        print(json.dumps(report, indent=2) if cfg.json else format_serving_report(report, cfg.name))
        return 0
    report = cost_report(
        cfg.model_config(),
        GPUS[cfg.gpu],
        tokens=parse_count(cfg.tokens),
        seq_len=cfg.seq_len,
        mfu=cfg.mfu,
        v3_report=cfg.v3_report,
        price_per_gpu_hour=cfg.price_per_gpu_hour,
        weights=cfg.weights,
        context_len=cfg.context_len,
        gpus_per_node=cfg.gpus_per_node,
    )
    prices = PriceTable.parse(cfg.prices, cfg.currency)
    inputs, outputs = parse_count(cfg.input_tokens), parse_count(cfg.output_tokens)
    hit = round(inputs * cfg.hit_rate)
    price = float(prices.cost(hit, round(inputs) - hit, round(outputs)))
    report["api"] = {
        "input_tokens": inputs,
        "output_tokens": outputs,
        "hit_rate": cfg.hit_rate,
        "price": price,
        "currency": prices.currency,
    }
    print(json.dumps(report, indent=2) if cfg.json else format_cost_report(report, cfg.name))
    return 0
