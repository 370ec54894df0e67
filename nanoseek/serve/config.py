"""The settings of the commands that run the engine (generate, chat, serve) and of `nanoseek ledger`: a light
module (no FastAPI, no engine), so that building the CLI stays quick."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoseek.cost import currency_flag, prices_flag
from nanoseek.flags import flag
from nanoseek.serve.sampling import SamplingParams

CACHE_UNIT = 64  # tokens per cached prefix block, as DeepSeek's context caching


@dataclass(slots=True)
class EngineConfig:
    """The inference engine's settings (`Engine(model, config)`), held by every command that runs one
    (generate, chat, serve, grpo, distill, eval), so that an option has one name everywhere."""

    weights: str = flag(
        "projection weights in memory: fp8 (E4M3 with 128x128 block scales, about 1 byte per parameter), int8 "
        "(projections and head with a scale per row, quantised at load: the fastest CPU decode), bf16 or fp32 "
        "(dequantised); auto: fp8 for an FP8 checkpoint",
        default="auto",
        choices=["auto", "fp8", "int8", "bf16", "fp32"],
    )
    fp8_cache: bool = flag("keep the latent KV cache in FP8", default=False)
    enforce_eager: bool = flag(
        "run decode steps eagerly, not captured: by default the decode step is compiled with torch.compile at its "
        "first use (seconds on a CPU, cached on disk for later starts; a server compiles at start-up), then runs "
        "with fewer per-step overheads",
        default=False,
    )
    pack_weights: str = flag(
        "on a CPU, decode on weights packed once for oneDNN's kernels (1.5-4x the bandwidth of a plain matmul at "
        "1-32 rows; one more copy of the weights in memory); auto: for a model larger than the CPU's cache",
        default="auto",
        choices=["auto", "on", "off"],
    )
    cache_memory_mb: float = flag("memory for the latent KV cache", default=256.0)
    max_batched_tokens: int = flag("tokens per engine step", default=512)
    max_seqs: int = flag("sequences per engine step", default=64)
    speculative_tokens: int = flag("MTP draft tokens per step (0: off)", default=0)
    cache_dir: str | None = flag("folder for the on-disk context cache", default=None)
    disk_cache_gb: float = flag("bound on the disk cache, LRU-evicted", default=8.0)
    dist_timeout: float = flag(
        "under torchrun: seconds before a collective of the MoE exchange between ranks times out (requests and "
        "the heartbeat travel on a control group that waits for days: an idle server lives on)",
        default=600.0,
    )
    redundant_experts: int = flag(
        "under torchrun: per MoE layer, give the N most loaded routed experts a second copy on another rank and "
        "split their tokens between the copies (DeepSeek's EPLB); the load comes from --expert-load, else is "
        "measured while serving",
        default=0,
        metavar="N",
    )
    expert_load: str | None = flag(
        'a JSON file of (token, expert) pairs per expert per MoE layer ({"layers": [[...], ...]}): read at start '
        "to place --redundant-experts, written at exit with the load measured while serving (added to it)",
        default=None,
        metavar="FILE",
    )

    def __post_init__(self) -> None:
        if min(self.disk_cache_gb, self.cache_memory_mb, self.dist_timeout) <= 0:
            raise ValueError("--disk-cache-gb, --cache-memory-mb and --dist-timeout must be positive")
        if self.max_seqs < 1 or self.max_batched_tokens < 1 or min(self.speculative_tokens, self.redundant_experts) < 0:
            raise ValueError(
                "--max-seqs and --max-batched-tokens must be positive, --speculative-tokens and "
                "--redundant-experts >= 0"
            )
        for name in ("weights", "pack_weights"):  # (the flags' choices, for settings made in Python)
            choices = EngineConfig.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")

    @classmethod
    def for_batches(cls) -> EngineConfig:
        """Sized for offline batches (rollouts, evaluation, teacher traces): many sequences per step."""
        return cls(max_seqs=256, max_batched_tokens=4096)


def model_flag() -> str:
    return flag("a model folder with its tokenizer", metavar="DIR")


@dataclass(slots=True)
class GenerateConfig:
    """Generate text from a prompt."""

    model: str = model_flag()
    prompt: str = flag("the prompt")
    chat: bool = flag("wrap the prompt in the chat template", default=False)
    stream: bool = flag("print the text as it comes (--no-stream: once it is complete)", default=True)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(slots=True)
class ChatConfig:
    """Chat with a model in the terminal, with streaming and the chat template."""

    model: str = model_flag()
    system: str = flag("a system prompt", default="")
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(slots=True)
class LedgerConfig:
    """Print (or export as CSV) every API key's usage, cost, balance and open reservations, from the SQLite
    ledger that `nanoseek serve` writes."""

    ledger: str = flag("the ledger file (serve's --ledger)", metavar="FILE")
    prices: str = prices_flag()
    currency: str = currency_flag()
    csv: bool = flag("CSV on stdout instead of a table", default=False)


@dataclass(slots=True)
class ServeConfig:
    """Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/models, /v1/billing, /metrics,
    and a chat page at /. Prompt prefixes are cached in 64-token units in memory and, with --cache-dir, on
    disk; usage is billed as cache-hit input, cache-miss input and output tokens."""

    model: str = model_flag()
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = flag("address to listen on", default="127.0.0.1")
    port: int = flag("port to listen on", default=8000)
    served_model_name: str = flag("model names clients send, comma-separated", default="nanoseek")
    reasoning_model_name: str = flag(
        "model names (comma-separated) whose replies think by default, as DeepSeek's "
        "deepseek-reasoner; a request's thinking field decides either way",
        default="",
    )
    api_keys: str | None = flag("file of 'KEY [BALANCE]' lines; none: no auth", default=None)
    prices: str = prices_flag()
    currency: str = currency_flag()
    ledger: str | None = flag(
        "SQLite billing ledger, shareable by servers (default: KEYS.ledger.db beside "
        "--api-keys, else ~/.local/share/nanoseek/ledger.db)",
        default=None,
    )
    admin_key: str | None = flag("bearer key for /metrics (required for it when --api-keys is set)", default=None)
    max_body_bytes: int = flag("larger request bodies get a 413 unread", default=4 * 2**20)
    max_pending: int = flag("requests in flight before 429", default=256)
    max_concurrent_per_key: int = flag("requests in flight per API key before 429 (0: no limit)", default=0)

    def __post_init__(self) -> None:
        if self.max_concurrent_per_key < 0:
            raise ValueError("--max-concurrent-per-key must be 0 (no limit) or positive")
        if min(self.max_pending, self.max_body_bytes) < 1:
            raise ValueError("--max-pending and --max-body-bytes must be positive")
        if self.admin_key is not None and not self.admin_key.strip():
            raise ValueError("--admin-key is empty (an unset variable?): give a key, or leave the flag out")

    @property
    def names(self) -> list[str]:
        return _names(self.served_model_name) + _names(self.reasoning_model_name)

    def thinks(self, model: str, thinking: str | None) -> bool | None:
        """Whether a reply opens with <think> (True), skips reasoning (False), or is left to the model (None)."""
        if thinking is not None:
            return thinking == "enabled"
        return True if model in _names(self.reasoning_model_name) else None


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]
