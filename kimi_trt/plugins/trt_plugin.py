"""TensorRT plugin `kimi_trt::noaux_tc_router`: noaux_tc routing inside an engine.

Built with TensorRT's quickly-deployable-plugin API (`tensorrt.plugin`, TensorRT >= 10.9
for the AOT form; the project pins 10.13):
  * register:  logits [T, E] (float32 or bfloat16), bias [E] float32 -> ids int32 [T, k],
               scales float32 [T, k]; attributes top_k, n_group, topk_group,
               routed_scaling_factor, norm_topk_prob (semantics: `routing`).
  * aot_impl:  compiles the Triton kernel to PTX (`routing_triton.compile_ptx`) at engine
               build time; TensorRT embeds it, so running the engine needs no Python.
               Kernel arguments follow TensorRT's AOT order: inputs (logits, bias), one
               extra int32 (T), outputs (ids, scales). The attributes are compile-time
               constants of that PTX. Grid = max(ceil(T / block_t), 1): T = 0 is legal.
  * impl:      the JIT fallback (`network.add_plugin(..., aot=False)`): runs the same
               Triton kernel from Python through torch at engine run time.

Use in a plain TensorRT network (ITensors in, ITensors out):

    ids, scales = add_noaux_tc_router(network, logits, bias, params)

Use inside a TensorRT-LLM network (the build helper's model code, where `logits` and
`bias` are `tensorrt_llm.functional.Tensor`s; only that code imports tensorrt_llm):

    from tensorrt_llm._common import default_trtnet
    from tensorrt_llm.functional import _create_tensor
    layer = add_noaux_tc_router_layer(
        default_trtnet(), logits.trt_tensor, bias.trt_tensor, params)
    token_selected_experts = _create_tensor(layer.get_output(0), layer)  # int32 [T, k]
    token_final_scales = _create_tensor(layer.get_output(1), layer)      # float32 [T, k]

then hand both to the MixtureOfExperts plugin in place of the graph's softmax routing.
Logits must be 2-D with a build-time constant E (flatten [B, S, E] first); `bias` is
typically `constant(e_score_correction_bias)` (float32). The plugin must be registered in
every process that *builds* engines (`add_noaux_tc_router` does it); per TensorRT's QDP
documentation an AOT plugin's engine then runs without this module.

tensorrt is imported lazily: importing this module works without it, and the functions
raise MissingCapability (exit code 3) with the reason when it is absent.
"""

import torch

from kimi_trt.errors import MissingCapability
from kimi_trt.plugins.routing import RouterParams
from kimi_trt.plugins.routing_triton import DEFAULT_LAUNCH, LaunchConfig

PLUGIN_NAMESPACE = "kimi_trt"
PLUGIN_NAME = "noaux_tc_router"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"

_registered_with: dict = {}


def _import_tensorrt():
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise MissingCapability(
            f"{PLUGIN_ID} needs TensorRT >= 10.9 with tensorrt.plugin ({exc})"
        ) from exc
    return trt, trtp


def register_noaux_tc_router(
    *, capability: int | None = None, launch: LaunchConfig = DEFAULT_LAUNCH
) -> None:
    """Register the plugin with TensorRT once per process.

    capability: GPU compute capability the AOT PTX targets (None: the building GPU's).
    """
    options = {"capability": capability, "launch": launch}
    if _registered_with:
        if _registered_with != options:
            raise ValueError(f"{PLUGIN_ID} already registered with {_registered_with}")
        return
    trt, trtp = _import_tensorrt()
    _define_plugin(trt, trtp, capability, launch)
    _registered_with.update(options)


def _define_plugin(trt, trtp, capability: int | None, launch: LaunchConfig) -> None:
    """The four QDP definitions. Annotations are real objects: tensorrt.plugin inspects them."""

    @trtp.register(PLUGIN_ID)
    def _describe(
        logits: trtp.TensorDesc,
        bias: trtp.TensorDesc,
        top_k: int,
        n_group: int,
        topk_group: int,
        routed_scaling_factor: float,
        norm_topk_prob: bool,
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        rows = logits.shape_expr[0]
        ids = trtp.from_shape_expr((rows, top_k), dtype=trt.DataType.INT32)
        scales = trtp.from_shape_expr((rows, top_k), dtype=trt.DataType.FLOAT)
        return ids, scales

    @trtp.autotune(PLUGIN_ID)
    def _formats(logits, bias, outputs) -> list[trtp.AutoTuneCombination]:
        # logits float32 or bfloat16 (independently); bias float32; ids int32; scales float32
        return [trtp.AutoTuneCombination("FP32*BF16, FP32, INT32, FP32", "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def _compile(
        logits: trtp.TensorDesc,
        bias: trtp.TensorDesc,
        top_k: int,
        n_group: int,
        topk_group: int,
        routed_scaling_factor: float,
        norm_topk_prob: bool,
        outputs: tuple[trtp.TensorDesc, trtp.TensorDesc],
        tactic: int,
    ) -> tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        from kimi_trt.plugins.routing_triton import compile_ptx

        params = RouterParams(top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
        dtype = torch.bfloat16 if logits.dtype == trt.DataType.BF16 else torch.float32
        num_experts = logits.shape_expr[1].constant_value()
        kernel = compile_ptx(dtype, num_experts, params, capability=capability, launch=launch)
        rows = logits.shape_expr[0]
        grid = trtp.KernelLaunchParams()
        grid.grid_x = trtp.max(trtp.cdiv(rows, kernel.block_t), 1)
        grid.block_x = kernel.block_x
        grid.shared_mem = kernel.shared_mem
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(rows)])
        return kernel.name.encode(), kernel.ptx.encode(), grid, extra

    @trtp.impl(PLUGIN_ID)
    def _run(
        logits: trtp.Tensor,
        bias: trtp.Tensor,
        top_k: int,
        n_group: int,
        topk_group: int,
        routed_scaling_factor: float,
        norm_topk_prob: bool,
        outputs: tuple[trtp.Tensor, trtp.Tensor],
        stream: int,
    ) -> None:
        from kimi_trt.plugins.routing_triton import route_triton

        params = RouterParams(top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            x = _torch_view(logits, trt)
            b = torch.as_tensor(bias, device="cuda")
            ids, scales = route_triton(x, b, **params.kwargs(), launch=launch)
            torch.as_tensor(outputs[0], device="cuda").copy_(ids)
            torch.as_tensor(outputs[1], device="cuda").copy_(scales)


class _CudaArray:
    """`__cuda_array_interface__` for a bfloat16 buffer (trtp.Tensor refuses bf16)."""

    def __init__(self, ptr: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (ptr, False),
            "strides": None,
            "version": 3,
        }


def _torch_view(tensor, trt) -> torch.Tensor:
    """A torch view of a TensorRT plugin tensor, bfloat16 included (through int16)."""
    if tensor.dtype == trt.DataType.BF16:
        raw = _CudaArray(tensor.data_ptr, tuple(tensor.shape), "<i2")
        return torch.as_tensor(raw, device="cuda").view(torch.bfloat16)
    return torch.as_tensor(tensor, device="cuda")


def add_noaux_tc_router_layer(network, logits, bias, params: RouterParams, *, aot: bool = True):
    """Add `kimi_trt::noaux_tc_router` to a TensorRT INetworkDefinition; return the layer.

    logits: ITensor [T, E] (float32/bfloat16, E a build-time constant); bias: ITensor [E]
    float32. Outputs 0 and 1 are ids int32 [T, k] and scales float32 [T, k]. aot=False
    selects the Python (JIT) implementation instead of the embedded PTX.
    """
    _, trtp = _import_tensorrt()
    if not _registered_with:
        register_noaux_tc_router()
    shape = tuple(logits.shape)
    if len(shape) != 2 or shape[1] < 0:
        raise ValueError(f"{PLUGIN_ID}: logits must be [T, E] with a constant E, got {shape}")
    if tuple(bias.shape) != (shape[1],):
        raise ValueError(f"{PLUGIN_ID}: bias must be [{shape[1]}], got {tuple(bias.shape)}")
    params.check(shape[1])
    op = getattr(getattr(trtp.op, PLUGIN_NAMESPACE), PLUGIN_NAME)
    layer = network.add_plugin(
        op(
            logits,
            bias,
            top_k=int(params.top_k),
            n_group=int(params.n_group),
            topk_group=int(params.topk_group),
            routed_scaling_factor=float(params.routed_scaling_factor),
            norm_topk_prob=bool(params.norm_topk_prob),
        ),
        aot=aot,
    )
    layer.name = f"{PLUGIN_NAME}_{network.num_layers}"
    return layer


def add_noaux_tc_router(network, logits, bias, params: RouterParams, *, aot: bool = True):
    """Like `add_noaux_tc_router_layer`, returning (ids ITensor, scales ITensor)."""
    layer = add_noaux_tc_router_layer(network, logits, bias, params, aot=aot)
    return layer.get_output(0), layer.get_output(1)
