"""How the torch executor's engine batches requests: one options object for `serve`, the
Triton `kimi` model and `load_engine` (torch-free, so the CLI and repository writer use it).

- batching "continuous" (default): requests join the running generation loop at its next
  step; "static": a batch runs to its end while newcomers wait (the "before" of
  bench/serve.py; TensorRT-LLM's executors batch on their own side either way).
- prefill_chunk: prompt tokens per step, so a long prompt never stalls decode for long.
- prefix_cache: reuse the KV blocks of a prompt prefix computed before (agents repeat the
  same system + tool-declaration prefix).
- batch_window_ms: static batching only - how long to collect requests into one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from kimi_trt.errors import UserError

BATCHING_MODES = ("continuous", "static")
KV_BLOCK_SIZE = 32  # tokens per KV block: the prefix cache's unit of reuse
DEFAULT_PREFILL_CHUNK = 256


@dataclass(frozen=True)
class Scheduling:
    batching: str = "continuous"
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prefix_cache: bool = True
    batch_window_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.batching not in BATCHING_MODES:
            raise UserError(
                f"batching must be one of {', '.join(BATCHING_MODES)}, got {self.batching!r}"
            )
        if isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int):
            raise UserError(f"prefill_chunk must be an integer, got {self.prefill_chunk!r}")
        if self.prefill_chunk < 1:
            raise UserError(f"prefill_chunk must be >= 1 token, got {self.prefill_chunk}")
        if not self.batch_window_ms >= 0:
            raise UserError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")

    def parameters(self) -> dict[str, str]:
        """As Triton model parameters (strings)."""
        return {
            "batching": self.batching,
            "prefill_chunk": str(self.prefill_chunk),
            "prefix_cache": "true" if self.prefix_cache else "false",
            "batch_window_ms": str(self.batch_window_ms),
        }

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> Scheduling:
        """From Triton model parameters (absent keys keep the defaults)."""
        d = cls()
        try:
            return cls(
                batching=params.get("batching", d.batching),
                prefill_chunk=int(params.get("prefill_chunk", d.prefill_chunk)),
                prefix_cache=params.get("prefix_cache", "true").lower() == "true",
                batch_window_ms=float(params.get("batch_window_ms", d.batch_window_ms)),
            )
        except ValueError as e:
            raise UserError(f"kimi model parameters: {e}") from None
