"""Triton Python-backend models (loaded through the `model.py` shims `kimi-trt triton-repo` writes).

- `KimiEngineModel` (`kimi`): runs a torch-executor engine dir with our runtime. Decoupled:
  each request streams one response per generated token (`output_ids`, `text_output`
  delta) and ends with a final response carrying `finish_reason`; with `streaming=false`
  it sends everything in one response. Requests from all clients go through one
  EngineBatcher, so concurrent requests share `generate` calls. A client that cancels
  (gRPC stream closed, `response_sender.is_cancelled()`) ends its request in the runtime.
  Multi-rank engine dirs: this model runs in rank 0's tritonserver (leader mode, see
  triton_server.py); the other ranks follow in `kimi-trt triton-worker`.
- `KimiSyncModel` (`kimi_sync`): one response per request, collected from `kimi` through
  BLS - for clients that cannot use a decoupled model (Triton's HTTP `infer`).
- `KimiPreprocessModel` / `KimiPostprocessModel`: the inflight-batching repository's text
  <-> ids steps for TensorRT-LLM engines, with KimiTokenizer.

`triton_python_backend_utils` exists only inside Triton's Python stub, so it is imported
when a model initializes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from kimi_trt.errors import UserError

log = logging.getLogger("kimi_trt.triton")
DEFAULT_MAX_TOKENS = 64
DEFAULT_TEMPERATURE = 0.6  # Kimi-K2's recommended sampling temperature


def _pb():
    import triton_python_backend_utils as pb_utils

    return pb_utils


def _parameters(args: dict[str, Any]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _optional(request, name: str):
    tensor = _pb().get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _scalar(request, name: str, default):
    value = _optional(request, name)
    return default if value is None or value.size == 0 else value.reshape(-1)[0].item()


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def sampling_from_request(request):
    """SamplingParams from the tensorrt_llm-style inputs (UserError on bad values)."""
    from kimi_trt.runtime.sampling import SamplingParams  # torch: only the engine model needs it

    seed = _scalar(request, "seed", None)
    stops = _optional(request, "stop_token_ids")
    return SamplingParams(
        max_new_tokens=int(_scalar(request, "request_output_len", DEFAULT_MAX_TOKENS)),
        temperature=float(_scalar(request, "temperature", DEFAULT_TEMPERATURE)),
        top_p=float(_scalar(request, "runtime_top_p", 1.0)),
        top_k=int(_scalar(request, "runtime_top_k", 0)),
        seed=None if seed is None else int(seed),
        stop_token_ids=None if stops is None else tuple(int(t) for t in stops.reshape(-1)),
    )


class _Responder:
    """Streams one request's tokens to its response sender (called on the batcher thread)."""

    def __init__(self, sender, tokenizer, streaming: bool):
        self.sender = sender
        self.streaming = streaming
        self.detok = tokenizer.detokenizer() if tokenizer is not None else None
        self.tokens: list[int] = []
        self.text = ""

    def _response(self, ids: list[int], text: str, reason: str):
        pb = _pb()
        return pb.InferenceResponse(
            output_tensors=[
                pb.Tensor("output_ids", np.asarray(ids, dtype=np.int32)),
                pb.Tensor("text_output", np.asarray([text.encode()], dtype=np.object_)),
                pb.Tensor("finish_reason", np.asarray([reason.encode()], dtype=np.object_)),
            ]
        )

    def on_token(self, token: int) -> bool:
        if self.sender.is_cancelled():
            return False
        self.tokens.append(token)
        delta = self.detok.feed(token) if self.detok is not None else ""
        self.text += delta
        if self.streaming:
            self.sender.send(self._response([token], delta, ""))
        return True

    def on_done(self, result, error) -> None:
        pb = _pb()
        if error is not None:
            message = str(error) if isinstance(error, UserError) else f"internal error: {error}"
            response = pb.InferenceResponse(error=pb.TritonError(message))
        else:
            tail = self.detok.flush() if self.detok is not None else ""
            self.text += tail
            reason = result.finish_reason or "stop"
            if self.streaming:
                response = self._response([], tail, reason)
            else:
                response = self._response(self.tokens, self.text, reason)
        self.sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class KimiEngineModel:
    """The `kimi` model: our runtime behind Triton (see the module docstring)."""

    def initialize(self, args: dict[str, Any]) -> None:
        from kimi_trt.runtime.engine import load_engine
        from kimi_trt.runtime.serving.batcher import EngineBatcher

        params = _parameters(args)
        if not _pb().using_decoupled_model_transaction_policy(json.loads(args["model_config"])):
            raise ValueError("the kimi model must be decoupled (kimi_sync serves whole responses)")
        self.engine = load_engine(params["engine_dir"])
        self.tokenizer = self.engine.tokenizer
        window = float(params.get("batch_window_ms", "5")) / 1000.0
        self.batcher = EngineBatcher(self.engine, window_s=window)

    def _prompt(self, request) -> list[int]:
        ids = _optional(request, "input_ids")
        if ids is not None and ids.size:
            return [int(t) for t in ids.reshape(-1)]
        text = _optional(request, "text_input")
        if text is None or text.size == 0:
            raise UserError("give input_ids or text_input")
        if self.tokenizer is None:
            raise UserError("this engine dir has no tokenizer: send input_ids, not text_input")
        return self.tokenizer.encode(_text(text.reshape(-1)[0]))

    def _submit(self, request) -> None:
        from kimi_trt.runtime.serving.batcher import BatchRequest

        streaming = bool(_scalar(request, "streaming", True))
        responder = _Responder(request.get_response_sender(), self.tokenizer, streaming)
        try:
            prompt, params = self._prompt(request), sampling_from_request(request)
        except (UserError, ValueError) as e:
            responder.on_done(None, UserError(str(e)))
            return
        self.batcher.submit(BatchRequest(prompt, params, responder.on_token, responder.on_done))

    def execute(self, requests):
        """Hand each request to the batcher and return at once (responses come from its thread)."""
        for request in requests:
            self._submit(request)
        return None

    def finalize(self) -> None:
        self.batcher.close()
        self.engine.shutdown()


class KimiSyncModel:
    """`kimi_sync`: one complete response per request, gathered from `kimi` over BLS."""

    OUTPUTS = ["output_ids", "text_output", "finish_reason"]

    def initialize(self, args: dict[str, Any]) -> None:
        self.target = _parameters(args).get("target_model", "kimi")

    def _collect(self, request):
        pb = _pb()
        inputs = list(request.inputs()) + [pb.Tensor("streaming", np.asarray([False]))]
        bls = pb.InferenceRequest(
            model_name=self.target, inputs=inputs, requested_output_names=self.OUTPUTS
        )
        outputs: list[Any] = []
        for response in bls.exec(decoupled=True):
            if response.has_error():
                return pb.InferenceResponse(error=response.error())
            tensors = response.output_tensors()
            if tensors:
                outputs = tensors
        return pb.InferenceResponse(output_tensors=outputs)

    def execute(self, requests):
        return [self._collect(request) for request in requests]


def _tokenizer(args: dict[str, Any]):
    from kimi_trt.runtime.tokenizer import KimiTokenizer

    return KimiTokenizer.from_dir(_parameters(args)["tokenizer_dir"])


def stop_words_tensor(stop_ids: list[int]) -> np.ndarray:
    """tensorrt_llm's stop_words_list for single-token stop words: [2, n] = ids, end offsets."""
    ids = np.asarray(stop_ids, dtype=np.int32)
    offsets = np.arange(1, len(stop_ids) + 1, dtype=np.int32)
    return np.stack([ids, offsets])


class KimiPreprocessModel:
    """`preprocessing`: QUERY text -> INPUT_ID (+ lengths, end/pad ids, stop words)."""

    def initialize(self, args: dict[str, Any]) -> None:
        self.tokenizer = _tokenizer(args)
        stops = list(self.tokenizer.eos_token_ids)
        self.end_id = stops[-1]  # <|im_end|>: chat turns end there
        self.stop_words = stop_words_tensor([t for t in stops if t != self.end_id])

    def _one(self, request):
        pb = _pb()
        queries = _optional(request, "QUERY").reshape(-1)
        ids = [self.tokenizer.encode(_text(q)) for q in queries]
        batch, width = len(ids), max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id
        padded = np.full((batch, width), pad, dtype=np.int32)
        for row, seq in enumerate(ids):
            padded[row, : len(seq)] = seq
        end = _optional(request, "END_ID")
        column = np.ones((batch, 1), dtype=np.int32)
        tensors = {
            "INPUT_ID": padded,
            "REQUEST_INPUT_LEN": np.asarray([[len(s)] for s in ids], dtype=np.int32),
            "REQUEST_OUTPUT_LEN": _optional(request, "REQUEST_OUTPUT_LEN").astype(np.int32),
            "OUT_END_ID": end.astype(np.int32) if end is not None else column * self.end_id,
            "OUT_PAD_ID": column * pad,
            "STOP_WORDS_IDS": np.repeat(self.stop_words[None], batch, axis=0),
        }
        return pb.InferenceResponse([pb.Tensor(k, v) for k, v in tensors.items()])

    def execute(self, requests):
        return [self._one(request) for request in requests]


class KimiPostprocessModel:
    """`postprocessing`: TOKENS_BATCH [batch, beam, len] + SEQUENCE_LENGTH -> OUTPUT text."""

    def initialize(self, args: dict[str, Any]) -> None:
        self.tokenizer = _tokenizer(args)
        self.skip = _parameters(args).get("skip_special_tokens", "true").lower() == "true"

    def _one(self, request):
        pb = _pb()
        tokens = _optional(request, "TOKENS_BATCH")
        lengths = _optional(request, "SEQUENCE_LENGTH")
        texts = [
            [
                self.tokenizer.decode(
                    [int(t) for t in beam[: int(n)]], skip_special=self.skip
                ).encode()
                for beam, n in zip(beams, beam_lengths, strict=True)
            ]
            for beams, beam_lengths in zip(tokens, lengths, strict=True)
        ]
        return pb.InferenceResponse([pb.Tensor("OUTPUT", np.asarray(texts, dtype=np.object_))])

    def execute(self, requests):
        return [self._one(request) for request in requests]
