"""Model arithmetic from a config alone (no weights): parameters, KV-cache bytes, FLOPs per token, and
what training and serving cost on rented GPUs.

    nanoseek cost --preset v3-671b --tokens 14.8T --gpu h800      # GPU-hours and dollars at an MFU
    nanoseek cost --preset v3-671b --v3-report                    # DeepSeek-V3's published budget, rebuilt

Counts follow the V3 paper's convention: the main model without the MTP modules (671B total, 37B
activated per token for DeepSeek-V3). The balancing bias is a buffer, not a parameter. Training FLOPs
per token are 3x the forward pass (forward + backward): 2 x every activated weight used in a matmul
(the embedding lookup is not one; the output head is), plus causal attention, H x (d_qk + d_v) x seq
per layer and token, plus the MTP modules. MFU is measured against the GPU's dense BF16 peak, the
usual convention, whatever precision the GEMMs run in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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


GPUS = {  # NVIDIA's datasheet peaks (SXM parts)
    "h800": GPU("H800 SXM", 989.4e12, 1978.9e12, 80e9, 3.35e12),
    "h100": GPU("H100 SXM", 989.4e12, 1978.9e12, 80e9, 3.35e12),
    "h200": GPU("H200 SXM", 989.4e12, 1978.9e12, 141e9, 4.8e12),
    "a100": GPU("A100 SXM 80GB", 312e12, None, 80e9, 2.039e12),
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


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True, mtp: bool = True) -> Flops:
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


def prices_flag() -> str:
    """The API prices option of every command that prices or bills (cost, serve, ledger): one name, one default
    (DeepSeek-V3's list prices in CNY)."""
    return flag("per million tokens: cache-hit,cache-miss,output", default="0.5,2,8")


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
    and money at an MFU; serving: weight bytes, latent KV bytes per token, contexts per node; and the API
    price of a workload at a cache-hit rate."""

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
    json: bool = flag("print one JSON object", default=False)


def print_cost(cfg: CostConfig) -> int:
    from nanoseek.serve.billing import PriceTable

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
