"""`nanoseek serve` settings: a light module (no FastAPI), so that building the CLI stays quick."""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.config import flag

CACHE_UNIT = 64  # tokens per cached prefix block, as DeepSeek's context caching


@dataclass(slots=True)
class ServeConfig:
    model: str | None = flag("a model folder with its tokenizer (required)", default=None)
    host: str = flag("address to listen on", default="127.0.0.1")
    port: int = flag("port to listen on", default=8000)
    served_model_name: str = flag("model names clients send, comma-separated", default="nanoseek")
    reasoning_model_name: str = flag(
        "model names (comma-separated) whose replies think by default, as DeepSeek's "
        "deepseek-reasoner; a request's thinking field decides either way",
        default="",
    )
    api_keys: str | None = flag("file of 'KEY [BALANCE]' lines; none: no auth", default=None)
    cache_dir: str | None = flag("folder for the on-disk context cache", default=None)
    disk_cache_gb: float = flag("bound on the disk cache, LRU-evicted", default=8.0)
    cache_memory_mb: int = flag("memory for the latent KV cache", default=256)
    prices: str = flag("per million tokens: cache-hit,cache-miss,output", default="0.5,2,8")
    currency: str = flag("currency of the prices", default="CNY")
    ledger: str | None = flag(
        "SQLite billing ledger, shareable by servers (default: KEYS.ledger.db beside "
        "--api-keys, else ~/.local/share/nanoseek/ledger.db)",
        default=None,
    )
    admin_key: str | None = flag("bearer key for /metrics (required for it when --api-keys is set)", default=None)
    max_body_bytes: int = flag("larger request bodies get a 413 unread", default=4 * 2**20)
    max_pending: int = flag("requests in flight before 429", default=256)
    max_concurrent_per_key: int = flag("requests in flight per API key before 429 (0: no limit)", default=0)
    max_batched_tokens: int = flag("tokens per engine step", default=512)
    max_seqs: int = flag("sequences per engine step", default=64)
    speculative_tokens: int = flag("MTP draft tokens per step (0: off)", default=0)
    fp8_cache: bool = flag("keep the latent KV cache in FP8", default=False)
    weights: str = flag(
        "projection weights in memory: fp8 (E4M3 with 128x128 block scales), bf16 or fp32; auto: "
        "fp8 for an FP8 checkpoint",
        default="auto",
    )
    enforce_eager: bool = flag(
        "run decode steps eagerly; by default each batch bucket up to --max-seqs is "
        "captured with torch.compile at start-up (seconds each on a CPU)",
        default=False,
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("nanoseek serve needs --model DIR (a folder with config.json and tokenizer.json)")
        if self.max_concurrent_per_key < 0:
            raise ValueError("--max-concurrent-per-key must be 0 (no limit) or positive")
        if min(self.max_pending, self.max_body_bytes) < 1 or self.disk_cache_gb <= 0 or self.cache_memory_mb <= 0:
            raise ValueError("--max-pending, --max-body-bytes, --disk-cache-gb and --cache-memory-mb must be positive")

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
