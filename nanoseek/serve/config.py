"""The settings of the commands that run the engine (generate, chat, serve) and of `nanoseek ledger`: a light
module (no FastAPI, no engine), so that building the CLI stays quick."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoseek.cost import currency_flag, prices_flag
from nanoseek.flags import flag, inherit
from nanoseek.serve.sampling import SamplingParams

CACHE_UNIT = 64  # tokens per cached prefix block, as DeepSeek's context caching


@dataclass(slots=True)
class EngineConfig:
    """The inference engine's settings, as every command that runs one takes them (generate, chat, serve)."""

    model: str = flag("a model folder with its tokenizer", metavar="DIR")
    weights: str = flag(
        "projection weights in memory: fp8 (E4M3 with 128x128 block scales, about 1 byte per parameter), bf16 "
        "or fp32 (dequantised); auto: fp8 for an FP8 checkpoint",
        default="auto",
        choices=["auto", "fp8", "bf16", "fp32"],
    )
    fp8_cache: bool = flag("keep the latent KV cache in FP8", default=False)
    enforce_eager: bool = flag(
        "run decode steps eagerly; --no-enforce-eager captures each batch bucket up to --max-seqs with "
        "torch.compile at start-up (seconds each on a CPU, then fewer per-step overheads)",
        default=True,
    )
    pack_weights: str = flag(
        "on a CPU, decode on weights packed once for oneDNN's kernels (1.5-4x the bandwidth of a plain matmul at "
        "1-32 rows; one more copy of the weights in memory); auto: for a model larger than the CPU's cache",
        default="auto",
        choices=["auto", "on", "off"],
    )
    cache_memory_mb: int = flag("memory for the latent KV cache", default=256)
    max_batched_tokens: int = flag("tokens per engine step", default=512)
    max_seqs: int = flag("sequences per engine step", default=64)
    speculative_tokens: int = flag("MTP draft tokens per step (0: off)", default=0)
    cache_dir: str | None = flag("folder for the on-disk context cache", default=None)
    disk_cache_gb: float = flag("bound on the disk cache, LRU-evicted", default=8.0)

    def __post_init__(self) -> None:
        if self.disk_cache_gb <= 0 or self.cache_memory_mb <= 0:
            raise ValueError("--disk-cache-gb and --cache-memory-mb must be positive")


@dataclass(slots=True, kw_only=True)  # its required fields follow defaulted ones
class GenerateConfig(EngineConfig):
    """Generate text from a prompt."""

    prompt: str = flag("the prompt")
    chat: bool = flag("wrap the prompt in the chat template", default=False)
    stream: bool = flag("print the text as it comes (--no-stream: once it is complete)", default=True)
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(slots=True)
class ChatConfig(EngineConfig):
    """Chat with a model in the terminal, with streaming and the chat template."""

    system: str = flag("a system prompt", default="")
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
class ServeConfig(EngineConfig):
    """Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/models, /v1/billing, /metrics,
    and a chat page at /. Prompt prefixes are cached in 64-token units in memory and, with --cache-dir, on
    disk; usage is billed as cache-hit input, cache-miss input and output tokens."""

    enforce_eager: bool = inherit(EngineConfig, "enforce_eager", False)  # a server captures its decode steps
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
        EngineConfig.__post_init__(self)  # (zero-argument super() fails in a slotted dataclass)
        if self.max_concurrent_per_key < 0:
            raise ValueError("--max-concurrent-per-key must be 0 (no limit) or positive")
        if min(self.max_pending, self.max_body_bytes) < 1:
            raise ValueError("--max-pending and --max-body-bytes must be positive")

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
