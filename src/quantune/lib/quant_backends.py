"""The quantization backends of the quantize stage: llm-compressor (GPTQModifier, AWQModifier, and
QuantizationModifier for round-to-nearest), GPTQModel (GPTQ in its own env, CUDA only) and bitsandbytes
(LLM.int8 / NF4 at load time). Each is imported only when a recipe uses it."""
from __future__ import annotations

import contextlib
import functools
import math
import re
from pathlib import Path
from typing import Any

from .common import fail


def _scheme(recipe: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    gs = recipe["group_size"]
    args = dict(num_bits=recipe["bits"], type="int", symmetric=not recipe["zero_point"])
    args.update(strategy="channel") if gs == -1 else args.update(strategy="group", group_size=gs)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))}


def llmcompressor_modifiers(recipe: dict, awq_mappings: list[dict] | None = None) -> list:
    """The llm-compressor recipe of a method: GPTQModifier, AWQModifier + QuantizationModifier, or
    QuantizationModifier alone (round-to-nearest, min-max observer), all with the same scheme."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = list(recipe["ignore"])
    method = recipe["method"]
    if method == "gptq":
        order = recipe["act_order"]
        return [GPTQModifier(config_groups=_scheme(recipe), ignore=ignore, dampening_frac=recipe["damp"],
                             block_size=recipe["block_size"], actorder=None if order == "none" else order)]
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier

        maps = [AWQMapping(m["smooth"], list(m["balance"])) for m in awq_mappings or []]
        return [AWQModifier(mappings=maps, duo_scaling=recipe["duo_scaling"], n_grid=recipe["n_grid"]),
                QuantizationModifier(config_groups=_scheme(recipe), ignore=ignore)]
    return [QuantizationModifier(config_groups=_scheme(recipe), ignore=ignore)]


@contextlib.contextmanager
def _cpu_safe_calibration():
    """llm-compressor 0.14.0.1's AWQ pins its activation cache (IntermediatesCache.pin_memory) before every
    grid search, which raises "Cannot access accelerator device" on a machine without one. Pinning only
    speeds up host-to-GPU copies, so on CPU it is skipped; with a GPU nothing is changed."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    orig = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = orig


class _Float32Batches:
    """A list of tensors read one at a time as float32 (no copy of the whole list)."""

    def __init__(self, tensors: list):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors)

    def __getitem__(self, i):
        return self.tensors[i].float()

    def __iter__(self):
        return (t.float() for t in self.tensors)


@contextlib.contextmanager
def fp32_awq_loss():
    """llm-compressor 0.14.0.1's AWQ grid search sums each batch's squared error in the model's dtype
    (mse_loss(reduction="sum") of fp16 outputs): past 65,504 the sum is inf, every grid point is non-finite and
    it raises "No finite loss was found" (seen at scale shape: random OPT-6.7b in fp16, batches of 8 x 512 x
    4096 outputs; upstream vllm-project/llm-compressor#2213). The loss is taken on float32 reads of each batch
    instead; at float32 (the tiny scale) nothing changes."""
    from llmcompressor.modifiers.transform.awq import AWQModifier

    orig = AWQModifier._compute_loss
    AWQModifier._compute_loss = lambda self, a, b: orig(self, _Float32Batches(a), _Float32Batches(b))
    try:
        yield
    finally:
        AWQModifier._compute_loss = orig


@contextlib.contextmanager
def _gptq_rtn_fallbacks(sink: list):
    """Collect the layers whose Hessian did not invert and that llm-compressor rounded to nearest instead: its
    GPTQModifier lists them only until on_finalize, which logs the list and then clears it (0.14.0.1)."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    orig = GPTQModifier._log_rtn_fallback_summary

    def _log(self):
        sink.extend(self._rtn_fallback_module_names)
        return orig(self)

    GPTQModifier._log_rtn_fallback_summary = _log
    try:
        yield
    finally:
        GPTQModifier._log_rtn_fallback_summary = orig


@contextlib.contextmanager
def _gptq_losses(sink: list):
    """Collect GPTQ's per-layer reconstruction losses that llm-compressor logs (METRIC 'error <loss>')."""
    from loguru import logger

    def _take(msg):
        rec = msg.record
        m = re.match(r"error ([0-9.eE+-]+)", rec["message"])
        if rec["level"].name == "METRIC" and rec["function"] == "GPTQ" and m:
            sink.append(float(m.group(1)))

    hid = logger.add(_take, level="METRIC", format="{message}")
    try:
        yield
    finally:
        logger.remove(hid)


# calibration tokens per forward in the fast mode: 8 rows of 2,048 (GPTQ), 32 of 512 (AWQ)
FAST_CALIBRATION_TOKENS = 16384
# tokens per tensor-core product in add_input_products: each product's sums stay short (see there)
HESSIAN_CHUNK_TOKENS = 2048
HESSIAN_PATHS = {
    "tensor_cores": f"TF32 tensor-core products of each {HESSIAN_CHUNK_TOKENS:,}-token chunk's centred inputs, plus "
                    "the chunk's mean outer product in fp32",
    "fp32": "fp32 matmul (llm-compressor's)"}


def calibration_batch_size(recipe: dict) -> int:
    """Rows per calibration forward: the recipe's, or in the fast mode at least FAST_CALIBRATION_TOKENS tokens'
    worth (the Hessians and AWQ's statistics sum over every row whatever the batching)."""
    rows = recipe["calibration_batch_size"]
    if recipe.get("speed") == "fast":
        rows = max(rows, FAST_CALIBRATION_TOKENS // recipe["calibration_seq_len"])
    return rows


@contextlib.contextmanager
def tf32_matmul():
    """fp32 matmuls on tensor cores in TF32 inside the block (torch.backends.cuda.matmul.allow_tf32)."""
    import torch

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def add_input_products(hessian, inp) -> None:
    """hessian += 2 X^T X for a Linear layer's half-precision input X (llm-compressor's GPTQ update, the factor 2
    applied after the product), fast on a GPU and meant to be as accurate as llm-compressor's fp32 matmul
    (bench/quant_speed.py's Hessian check measures both against float64).

    On the H200 one TF32 product over 16,384 standard-normal fp16 tokens differed from llm-compressor's fp32 one by
    1.1e-4 of the largest entry (~1,000x fp32's summation error), and with it 24 of OPT-6.7B's fc2 Hessians did
    not invert (bench/results/quant_speed.md). The likely mechanism: tensor cores truncate rather than round as they
    align and add a product's terms (Fasi et al., "Numerical behavior of NVIDIA tensor cores", 2021), so a long sum
    of same-sign terms drifts towards zero; fc2's inputs are post-ReLU (>= 0), every entry of X^T X is such a sum,
    and the error lines up with the Hessian's dominant eigenvector, past GPTQ's 1% damping. Hence, per chunk of
    HESSIAN_CHUNK_TOKENS rows: the rows' mean mu is taken out (X = Xc + 1 mu^T, so X^T X = Xc^T Xc + n mu mu^T
    exactly), Xc^T Xc runs on tensor cores in TF32, where its mixed-sign sums over a chunk stay small, and
    n mu mu^T is added in fp32 on CUDA cores; the chunks are added in fp32.
    On a CPU the TF32 switch does nothing: fp32 throughout."""
    import torch

    x = inp.to(hessian.device).reshape(-1, inp.shape[-1])
    for chunk in x.split(HESSIAN_CHUNK_TOKENS):
        c = chunk.to(torch.float32, copy=True)  # centred in place below: never the caller's tensor
        mu = c.mean(dim=0)
        c -= mu
        with tf32_matmul():
            hessian.addmm_(c.t(), c, alpha=2.0)
        hessian.addr_(mu, mu, alpha=2.0 * c.shape[0])


class GptqHessians:
    """GPTQModifier's calibration hook for the fast mode (patched in by `fast_gptq_hessians`):
    - one Hessian for the layers that read the same input tensor (q_proj, k_proj and v_proj read one LayerNorm's
      output): the first layer's accumulator is shared by reference, so the products are taken once, not three times;
    - on a GPU, the half-precision inputs' products on tensor cores, centred chunk by chunk (`add_input_products`);
    - the samples counted as the recipe's batching counts them (see __init__).
    Elsewhere (a CPU, fp32 inputs, other layer types) llm-compressor's own update runs, so on a CPU at the recipe's
    batch size the quantized weights are those of llm-compressor's path bit for bit."""

    def __init__(self, seed_tokens_per_call: int):
        # llm-compressor counts a Hessian's samples as its inputs' leading dimension: the batch's rows for a 3-D
        # input, but 1 for a 2-D one (OPT flattens the tokens before fc1 and fc2), i.e. one per forward call. The
        # fast mode's larger batches would then count fewer samples than the recipe's batching and scale those
        # Hessians (and GPTQ's reported losses) up; a 2-D input counts its tokens / the recipe's tokens per call.
        self.seed_tokens_per_call = seed_tokens_per_call
        self.last = None  # (weak reference to the last input accumulated, its version, the module it went to)
        self.shared = 0
        self.paths: set[str] = set()

    def calibrate(self, modifier, module, args, _output) -> None:
        import weakref

        import torch
        from compressed_tensors.utils import get_execution_device
        from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, make_empty_hessian

        inp, last = args[0], self.last
        if last is not None and last[0]() is inp and last[1] == inp._version:
            h = modifier._hessians.get(last[2])
            if h is not None and modifier._hessians.get(module) is h:
                return  # shares it already: this input was added by the layer it shares with
            if h is not None and module not in modifier._hessians and h.shape[0] == module.weight.shape[-1]:
                modifier._hessians[module] = h
                modifier._num_samples[module] = modifier._num_samples[last[2]]
                self.shared += 1
                return
        if module not in modifier._num_samples:  # as llm-compressor's hook starts one
            dev = get_execution_device(module)
            modifier._hessians[module] = make_empty_hessian(module, device=dev)
            modifier._num_samples[module] = torch.zeros((), device=dev)
        h, n = modifier._hessians[module], modifier._num_samples[module]
        if h.is_cuda and type(module) is torch.nn.Linear and inp.dtype in (torch.float16, torch.bfloat16):
            add_input_products(h, inp)
            n += self.samples(inp)
            self.paths.add("tensor_cores")
        else:
            modifier._hessians[module], n = accumulate_hessian(inp, module, h, n)
            n += self.samples(inp) - (1 if inp.dim() == 2 else inp.shape[0])  # from its count to the recipe's
            modifier._num_samples[module] = n
            self.paths.add("fp32")
        self.last = (weakref.ref(inp), inp._version, module)

    def samples(self, inp) -> float:
        """The samples llm-compressor counts for this input under the recipe's batching: the leading dimension of
        a 3-D (or higher) input, the recipe's calls' worth of tokens for a 2-D one (up to a partial last batch,
        which llm-compressor counts as a whole call)."""
        return inp.shape[0] / self.seed_tokens_per_call if inp.dim() == 2 else inp.shape[0]

    def describe(self) -> dict:
        return {"hessian_products": " and ".join(HESSIAN_PATHS[p] for p in sorted(self.paths)) or None,
                "hessians_shared": self.shared}


@contextlib.contextmanager
def fast_gptq_hessians(state: GptqHessians):
    from llmcompressor.modifiers.gptq.base import GPTQModifier

    orig = GPTQModifier.calibrate_module
    GPTQModifier.calibrate_module = lambda self, module, args, output: state.calibrate(self, module, args, output)
    try:
        yield state
    finally:
        GPTQModifier.calibrate_module = orig


def _pow2_scale(t, top: float = 2.0 ** 14) -> float:
    """A power of two that brings t's largest magnitude to at most `top` (fp16's largest is 65,504), exactly
    invertible; 1 for an all-zero t."""
    m = t.abs().max().item()
    return 2.0 ** math.floor(math.log2(top / m)) if m > 0 and math.isfinite(m) else 1.0


@functools.cache
def _fp32_output_products(device) -> bool:
    """Whether torch.mm takes out_dtype for fp16 operands on this device (tried once a device)."""
    import torch

    try:
        x = torch.ones(16, 16, device=device, dtype=torch.float16)
        return torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def to_half(t):
    """(t scaled by a power of two into fp16's range and rounded to nearest, the scale) for half_product, or None
    where t is not on a GPU or this torch has no fp16 product with an fp32 result: the caller's TF32 path."""
    if not (t.is_cuda and _fp32_output_products(t.device)):
        return None
    scale = _pow2_scale(t)
    return (t * scale).half(), scale


def half_product(a, b_half):
    """a @ b for an fp32 GPU tensor a and b as to_half gave it, as an fp16 tensor-core product with an fp32 result
    (torch.mm's out_dtype): a rounded like b to fp16's 10 mantissa bits (TF32 truncates to the same bits). With it
    a grid point's loss at fc2's shape took 5.0 ms against 6.5 in TF32 (AWQ grid-loss check, one H100,
    bench/results/quant_speed.md)."""
    import torch

    ha = to_half(a)
    return torch.mm(ha[0], b_half[0], out_dtype=torch.float32).mul_(1.0 / (ha[1] * b_half[1]))


def centred_gram(inputs, width: int, device) -> tuple:
    """The centred Gram matrix Xc^T Xc (fp32; TF32 tensor-core products of HESSIAN_CHUNK_TOKENS-row chunks on a
    GPU, accumulated in place: on one H100 at fc2's shape faster than half_product's scaled fp16 chunks, whose
    separate fp32 result and sum cost more than the faster product saved (bench/results/quant_speed.md)), the mean
    row mu and the row count n of the rows of the tensors `inputs()` yields (called twice: the mean first), so that
    X^T X = Xc^T Xc + n mu mu^T."""
    import torch

    total, n = torch.zeros(width, dtype=torch.float32, device=device), 0
    for x in inputs():
        x = x.to(device).reshape(-1, width)
        total += x.sum(dim=0, dtype=torch.float32)
        n += x.shape[0]
    mean = total / n
    g = torch.zeros(width, width, dtype=torch.float32, device=device)
    for x in inputs():
        for chunk in x.to(device).reshape(-1, width).split(HESSIAN_CHUNK_TOKENS):
            c = chunk.to(torch.float32, copy=True)
            c -= mean
            with tf32_matmul():
                g.addmm_(c.t(), c)
    return g, mean, n


def half_squared_error(fp16_outputs, int_w_outputs) -> float | None:
    """AWQModifier._compute_loss's mean squared error for half-precision outputs on a GPU, without its float32 copies:
    each batch's difference taken in the outputs' dtype and its norm accumulated in fp32
    (torch.linalg.vector_norm's dtype), so one half-precision difference is written where the seed path writes
    fp32 copies of both outputs (fp32_awq_loss) and then their fp32 difference. The difference is rounded once to
    the outputs' precision (2^-11 relative in fp16); bench/quant_speed.py's grid-loss check measures the loss
    against float64 (`forwards_half_loss`). None (llm-compressor's loss runs) with loss masks, across ranks, where an
    output is not a CUDA fp16 / bf16 tensor, or where a difference overflowed the dtype."""
    import torch
    from llmcompressor.core import active_session

    state = active_session().state
    if (state is not None and state.loss_masks) or (torch.distributed.is_available()
                                                     and torch.distributed.is_initialized()):
        return None
    pairs = list(zip(fp16_outputs, int_w_outputs))
    if not pairs or not all(a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype
                            for a, b in pairs):
        return None
    total = torch.zeros((), dtype=torch.float32, device=pairs[0][0].device)
    n = 0
    for a, b in pairs:
        total += torch.linalg.vector_norm(a - b.to(a.device), dtype=torch.float32).square()
        n += a.numel()
    loss = (total / n).item()
    return loss if math.isfinite(loss) else None  # a difference past the dtype's range: the fp32 path decides


class AwqLinearLoss:
    """AWQModifier's grid-search loss in the fast mode for a mapping whose parent is its one balance Linear (OPT's
    v_proj -> out_proj, final_layer_norm -> fc1 and fc1 -> fc2: 3 of its 4 mappings; Llama's o_proj and down_proj).
    llm-compressor runs the parent over every calibration batch at each of n_grid scales and takes the mean squared
    difference from the unquantized outputs. For Y = X W^T + b and Y' = X W'^T + b that is
    ||X D^T||^2 / (tokens x out_features) with D = W' - W: the bias cancels and the sum is the quadratic form
    tr(D X^T X D^T) of the inputs' Gram matrix. So the matrix is taken once per mapping from the inputs AWQ cached,
    centred (X^T X = Xc^T Xc + n mu mu^T, as add_input_products does: on a GPU Xc^T Xc on TF32 tensor cores and
    D Xc^T Xc as an fp16 product with an fp32 result (half_product; TF32 where torch has none), the mean's term in
    fp32), and a grid point costs one out x in x in product in place of a forward over every
    token (OPT-6.7B's fc1: 4,096 x 4,096 x 16,384 against 65,536 x 4,096 x 16,384). The grid, observers, qparams and
    the smoothing stay llm-compressor's, and the parent's unquantized forward still runs once (the finiteness check
    before the search). On a CPU in fp32 the loss is llm-compressor's to within 2e-7 relative (tiny OPT, every grid
    point: tests/test_quantize.py). With loss masks (state.loss_masks) or any other parent the forwards run."""

    def __init__(self):
        self.active = None  # (parent, centred Gram matrix, mean input, tokens, unquantized weight, the Gram matrix
        # in fp16 for half_product or None) while it searches
        self.gram_mappings = self.forward_mappings = 0
        self.fused_losses = 0  # grid points of the other mappings whose loss half_squared_error took

    @staticmethod
    def applies(mapping, cache) -> bool:
        """A Linear parent that is the mapping's one balance layer, called with its input alone, and no loss masks."""
        import torch
        from llmcompressor.core import active_session

        state = active_session().state
        parent = mapping.parent
        if not (isinstance(parent, torch.nn.Linear) and list(mapping.balance_layers) == [parent]
                and not (state is not None and state.loss_masks)):
            return False
        first = next(iter(cache), None)  # the arguments AWQ cached for the parent's forwards
        return first is not None and set(first) == {"input"}

    def best_scale(self, orig, modifier, mapping, fp16_outputs, orig_layer_weights):
        parent, cache = mapping.parent, modifier._parent_args_cache[mapping.parent]
        if not self.applies(mapping, cache):
            self.forward_mappings += 1
            return orig(modifier, mapping, fp16_outputs, orig_layer_weights)
        gram = centred_gram(lambda: (batch["input"] for batch in cache), parent.in_features, parent.weight.device)
        self.active = (parent, *gram, orig_layer_weights[parent], to_half(gram[0]))
        self.gram_mappings += 1
        try:
            return orig(modifier, mapping, fp16_outputs, orig_layer_weights)
        finally:
            self.active = None

    def run_samples(self, orig, modifier, module):
        if self.active is not None and module is self.active[0]:
            return [module.weight]  # this grid point's weight W'; the loss needs nothing else of the outputs
        return orig(modifier, module)

    def loss(self, orig, modifier, fp16_outputs, int_w_outputs):
        if self.active is None:
            fused = half_squared_error(fp16_outputs, int_w_outputs)
            if fused is None:
                return orig(modifier, fp16_outputs, int_w_outputs)
            self.fused_losses += 1
            return fused
        import torch

        _, g, mean, n, w0, g_half = self.active
        d = int_w_outputs[0].to(torch.float32) - w0.to(torch.float32)
        if g_half is not None:
            dg = half_product(d, g_half)
        else:
            with tf32_matmul():
                dg = d @ g
        quad = dg.mul_(d).sum()
        dm = d @ mean
        return ((quad + n * dm.dot(dm)) / (n * d.shape[0])).item()

    def describe(self) -> str:
        return (f"AWQ grid-search loss from the inputs' Gram matrix for {self.gram_mappings} mappings whose parent is "
                f"their one balance Linear, the parent's forwards for {self.forward_mappings}"
                + (f" (their squared error read once in half precision at {self.fused_losses} grid points)"
                   if self.fused_losses else ""))


@contextlib.contextmanager
def fast_awq_linear_loss(state: AwqLinearLoss):
    from llmcompressor.modifiers.transform.awq import AWQModifier

    names = ("_compute_best_scale", "_run_samples", "_compute_loss")
    origs = {k: getattr(AWQModifier, k) for k in names}
    AWQModifier._compute_best_scale = lambda self, *a: state.best_scale(origs["_compute_best_scale"], self, *a)
    AWQModifier._run_samples = lambda self, module: state.run_samples(origs["_run_samples"], self, module)
    AWQModifier._compute_loss = lambda self, a, b: state.loss(origs["_compute_loss"], self, a, b)
    try:
        yield state
    finally:
        for k, f in origs.items():
            setattr(AWQModifier, k, f)


class SdpaScaleSearch:
    """AWQ's scale search in the fast mode under the model's SDPA attention instead of the eager attention that
    llm-compressor 0.14's calibration context forces for the whole pipeline (helpers.use_eager_attention: its
    traced subgraphs bake in the eager causal-mask add, so the calibration forwards stay eager). The search calls
    the parent modules directly with the arguments those forwards cached, mask included, so the attention mapping's
    n_grid + 1 forwards a layer take the same additive 4-D mask through torch's scaled_dot_product_attention instead
    of fp16 scores, an fp32 softmax and a cast written out for every head (OPT's eager_attention_forward): the same
    attention to rounding. For models with SDPA (PreTrainedModel._supports_sdpa) whose calibration runs eager."""

    def __init__(self):
        self.searches = 0  # _apply_smoothing calls with mappings to smooth (one a decoder layer) run under SDPA

    def apply_smoothing(self, orig, modifier, model):
        from compressed_tensors.utils import patch_attr
        from llmcompressor.utils import helpers

        cfg = getattr(model, "config", None)
        pending = any(m.smooth_name in modifier._smooth_activation_stats for m in modifier._resolved_mappings)
        if not (pending and getattr(model, "_supports_sdpa", False) and getattr(cfg, "_attn_implementation", None)
                == "eager"):
            return orig(modifier, model)
        self.searches += 1
        # _apply_smoothing enters the calibration context again: its eager switch is made a no-op meanwhile
        with patch_attr(helpers, "use_eager_attention", lambda m: contextlib.nullcontext()), \
                patch_attr(cfg, "_attn_implementation", "sdpa"):
            return orig(modifier, model)


@contextlib.contextmanager
def sdpa_scale_search(state: SdpaScaleSearch):
    from llmcompressor.modifiers.transform.awq import AWQModifier

    orig = AWQModifier._apply_smoothing
    AWQModifier._apply_smoothing = lambda self, model: state.apply_smoothing(orig, self, model)
    try:
        yield state
    finally:
        AWQModifier._apply_smoothing = orig


@contextlib.contextmanager
def offload_updates_in_dtype():
    """compressed-tensors 0.19 writes a changed parameter of an offloaded module back with
    CPUCache.update_offload, `offloaded.copy_(data)`. AWQ's smoothing hands it the product of an fp16 weight and fp32
    scales, an fp32 tensor on the GPU, and a blocking copy from the GPU into a CPU tensor of another dtype converts on
    the CPU side: through a fresh pageable fp32 buffer, then a CPU cast (38.2 s of OPT-6.7B's AWQ on an H100 with the
    model offloaded, ~0.45 GB/s: bench/results/quant_speed.md). The value is cast to the offloaded tensor's dtype on
    its own device first, the same round-to-nearest-even cast, so the copy is one DMA into page-locked memory and the
    weights are the same bits."""
    from compressed_tensors.offload.cache.cpu import CPUCache

    orig = CPUCache.update_offload

    def update_offload(self, offloaded, data):
        if data is not None and offloaded is not None and data.dtype != offloaded.dtype:
            data = data.to(offloaded.dtype)
        return orig(self, offloaded, data)

    CPUCache.update_offload = update_offload
    try:
        yield
    finally:
        CPUCache.update_offload = orig


# the fast mode keeps the activations between decoder layers on the GPU up to this size (inputs and outputs of a
# layer: 2 x 128 x 2,048 x 4,096 fp16 = 4 GiB for OPT-6.7B's GPTQ calibration; an attention implementation that
# caches a 4-D causal mask adds ~1 GiB there), else on the CPU, llm-compressor's default
FAST_GPU_ACTIVATIONS_BYTES = 4 * 2**30


def activations_placement(model, tokens: int, device: str) -> dict:
    """oneshot's arguments for where the sequential pipeline keeps the activations between layers in the fast mode:
    on the GPU (no host traffic) when a layer's inputs and outputs for every calibration token fit
    FAST_GPU_ACTIVATIONS_BYTES, else none (on the CPU as llm-compressor does; its sequential_prefetch is not used:
    in 0.14 it copies from unpinned CPU tensors on a side stream)."""
    hidden = model.config.get_text_config().hidden_size
    if 2 * tokens * hidden * model.dtype.itemsize <= FAST_GPU_ACTIVATIONS_BYTES:
        return {"sequential_offload_device": device}
    return {}


def quantize_llmcompressor(model, tokenizer, recipe: dict, samples: dict | None, awq_mappings,
                           device: str = "cpu") -> dict:
    """Run llm-compressor's oneshot on `model` in place; returns extra numbers (GPTQ losses, what the fast mode
    changed). The fast mode (`speed: fast`) keeps llm-compressor's GPTQ / AWQ and its sequential pipeline and
    changes how the same sums are computed: calibration batches of FAST_CALIBRATION_TOKENS, GPTQ's Hessians by
    GptqHessians, and on a GPU (`device` cuda) the activations between layers kept there (activations_placement)."""
    import torch
    from llmcompressor import oneshot

    fast = recipe.get("speed") == "fast"
    kwargs: dict[str, Any] = {}
    out: dict[str, Any] = {}
    seed_tokens_per_call = recipe.get("calibration_seq_len", 1)  # tokens per call of llm-compressor's own path
    if samples is not None:
        # equal-length token windows as a plain DataLoader (oneshot takes one as is): no `datasets` Arrow table
        # and fingerprinting in between (Dataset.from_dict fails under Python 3.12 + dill 0.4 on the GPU image)
        from torch.utils.data import DataLoader
        from transformers import default_data_collator

        rows = [{"input_ids": torch.tensor(s, dtype=torch.long), "attention_mask": torch.ones(len(s), dtype=torch.long)}
                for s in samples["input_ids"]]
        batch = min(calibration_batch_size(recipe), len(rows))
        seed_tokens_per_call = min(recipe["calibration_batch_size"], len(rows)) * len(rows[0]["input_ids"])
        kwargs = dict(dataset=DataLoader(rows, batch_size=batch, shuffle=False, collate_fn=default_data_collator))
        out["calibration_batch_size"] = batch
        if fast and device == "cuda":
            kwargs.update(activations_placement(model, len(rows) * len(rows[0]["input_ids"]),
                                                f"cuda:{torch.cuda.current_device()}"))
            out["_activations_on"] = kwargs.get("sequential_offload_device", "cpu")  # for speed_changes
    losses: list[float] = []
    fallbacks: list[str] = []
    hessians = awq_loss = awq_sdpa = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(_cpu_safe_calibration())
        stack.enter_context(fp32_awq_loss())
        stack.enter_context(_gptq_losses(losses))
        stack.enter_context(_gptq_rtn_fallbacks(fallbacks))
        if fast and recipe["method"] == "gptq":
            hessians = GptqHessians(seed_tokens_per_call)
            stack.enter_context(fast_gptq_hessians(hessians))
        if fast and recipe["method"] == "awq":  # after fp32_awq_loss: its loss is the one wrapped
            awq_loss = stack.enter_context(fast_awq_linear_loss(AwqLinearLoss()))
            awq_sdpa = stack.enter_context(sdpa_scale_search(SdpaScaleSearch()))
        if fast:
            stack.enter_context(offload_updates_in_dtype())
        oneshot(model=model, processor=tokenizer, recipe=llmcompressor_modifiers(recipe, awq_mappings), **kwargs)
    if losses:
        out.update({"gptq_layers": len(losses), "gptq_loss_mean": sum(losses) / len(losses),
                    "gptq_loss_max": max(losses), "_gptq_losses": losses})
    if awq_loss is not None:
        out.update(awq_grid_loss=awq_loss.describe(), awq_gram_mappings=awq_loss.gram_mappings,
                   awq_sdpa_searches=awq_sdpa.searches)
    if recipe["method"] == "gptq":
        # layers whose Hessian did not invert: llm-compressor rounded them to nearest
        out["gptq_rtn_fallback_layers"] = len(fallbacks)
        out.update(hessians.describe() if hessians
                   else {"hessian_products": HESSIAN_PATHS["fp32"], "hessians_shared": 0})
    return out


def quantize_gptqmodel(source: str, tokenizer, recipe: dict, samples: dict, save_dir: Path, where: str) -> None:
    """GPTQ with GPTQModel (the maintained successor of auto-gptq; CUDA kernels). Imported only here."""
    try:
        from gptqmodel import GPTQConfig, GPTQModel
    except ImportError:
        raise fail(f"{where}: key backend", "backend gptqmodel is selected but the gptqmodel package is not installed",
                   "run with --use-conda: envs/gptqmodel.yaml (GPTQModel 7.6.0, on a CUDA GPU), "
                   "or set backend: llmcompressor") from None
    qcfg = GPTQConfig(bits=recipe["bits"], group_size=recipe["group_size"], sym=not recipe["zero_point"],
                      desc_act=recipe["act_order"] == "group", damp_percent=recipe["damp"])
    model = GPTQModel.load(source, qcfg)
    calib = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples["input_ids"]]
    model.quantize(calib, batch_size=recipe["calibration_batch_size"])
    model.save(str(save_dir))
    tokenizer.save_pretrained(save_dir)


def bnb_config(recipe: dict):
    import torch
    from transformers import BitsAndBytesConfig

    if recipe["method"] == "bnb_int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=recipe["int8_threshold"])
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recipe["quant_type"],
                              bnb_4bit_use_double_quant=recipe["double_quant"],
                              bnb_4bit_compute_dtype=getattr(torch, recipe["compute_dtype"]))
