"""The memory planner: per-rank training memory of a config under a parallel layout, without building the model.

``python train.py --config X --plan [--plan-memory 80GB] [overrides]`` prints it. Four parts, per rank:

- **parameters, gradients, optimizer state** counted on the meta-device skeleton
  (:func:`zoo.model.build_skeleton`: shapes only, nothing allocated), split into routed-expert and other
  parameters. Bytes per parameter follow the Lightning precision: ``*-mixed`` and ``32-true`` keep float32
  parameters (they are the master weights), float32 gradients and AdamW's two float32 moments (Loshchilov &
  Hutter 2019, Alg. 2: ``m_t``, ``v_t``); ``*-true`` 16-bit precisions keep all three in 16 bits (no master
  copy). Expert parallelism divides the routed experts by ``expert_parallel``; FSDP (ZeRO-3, Rajbhandari et
  al. 2020, §5) shards the other parameters, their gradients and optimizer state over all ``dp x ep`` ranks
  and the experts further over the ``dp`` ranks of each expert group.
- **activations**: what autograd saves for backward, per micro-batch. Each distinct decoder layer's norms,
  mixer and dense FFN run once on the meta device under ``torch.autograd.graph.saved_tensors_hooks`` at the
  planned micro-batch and sequence length (exact shapes, no memory, no compute); a MoE layer's routed experts,
  whose sizes depend on routing, are counted from what the grouped-GEMM node saves per routed row (balanced,
  dropless: ``tokens x top_k`` rows). Mixed precision adds the 16-bit copies autocast saves of matmul
  weights and inputs. With ``activation_checkpointing: full`` (Chen et al. 2016, §3) only each block's input is
  kept, plus one block's activations while it is recomputed.

:func:`plan_memory` takes the layout as explicit arguments; :func:`plan_from_config` reads them from a run
config (``train.parallel.*`` when the config has them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from zoo.blocks.experts import Experts
from zoo.blocks.moe import MoE
from zoo.errors import ConfigError
from zoo.model import ModelConfig, build_skeleton
from zoo.model.block import Block

# bytes per element of (parameter, gradient, one AdamW moment, activation) for each Lightning precision
PRECISION_BYTES = {"32-true": (4, 4, 4, 4), "32": (4, 4, 4, 4), "64-true": (8, 8, 8, 8), "64": (8, 8, 8, 8),
                   "bf16-mixed": (4, 4, 4, 2), "16-mixed": (4, 4, 4, 2),
                   "bf16-true": (2, 2, 2, 2), "16-true": (2, 2, 2, 2), "bf16": (2, 2, 2, 2), "16": (2, 2, 2, 2)}
_META_DTYPES = {8: torch.float64, 4: torch.float32, 2: torch.bfloat16}


@dataclass
class MemoryPlan:
    """Bytes per rank; ``activations`` for ``micro_batch`` sequences of ``seq_len`` tokens."""

    layout: dict
    parameters: int  # parameter count held by this rank
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    activation_bytes_per_sequence: float
    fixed_activation_bytes: int  # per step, independent of the micro-batch (e.g. the fused head's weight gradient)
    notes: list[str] = field(default_factory=list)

    @property
    def state_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes

    def max_micro_batch(self, device_bytes: float) -> int:
        """The largest micro-batch whose planned total fits ``device_bytes`` (0 when the states alone do not)."""
        free = device_bytes - self.state_bytes - self.fixed_activation_bytes
        return max(0, math.floor(free / self.activation_bytes_per_sequence))

    def report(self, device_bytes: float | None = None) -> str:
        layout = ", ".join(f"{k}={v}" for k, v in self.layout.items())
        rows = [("parameters", self.parameter_bytes, f"{self.parameters:,} per rank"),
                ("gradients", self.gradient_bytes, ""), ("optimizer state", self.optimizer_bytes, "AdamW, 2 moments"),
                ("activations", self.activation_bytes, f"{format_bytes(self.activation_bytes_per_sequence)} "
                                                       "per sequence"),
                ("total", self.total_bytes, "")]
        lines = [f"memory plan per rank ({layout})"]
        lines += [f"  {name:<16}{format_bytes(n):>12}  {note}".rstrip() for name, n, note in rows]
        if device_bytes is not None:
            lines.append(f"  largest micro-batch in {format_bytes(device_bytes)}: {self.max_micro_batch(device_bytes)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def plan_memory(model: ModelConfig, micro_batch: int, seq_len: int, data_parallel: int = 1,
                expert_parallel: int = 1, fsdp: bool = False, activation_checkpointing: str = "none",
                precision: str = "bf16-mixed", expert_row_align: int = 1) -> MemoryPlan:
    """The per-rank :class:`MemoryPlan` of training ``model`` with ``micro_batch`` sequences of ``seq_len`` tokens
    per rank on a ``data_parallel x expert_parallel`` mesh (see the module docstring). ``expert_row_align``: the
    multiple each expert's rows are padded to (``zoo.blocks.experts.CPU_ROW_ALIGN`` on CPU, 1 on GPUs)."""
    precision = "bf16-mixed" if precision == "auto" else str(precision)
    if precision not in PRECISION_BYTES:
        raise ConfigError(f"train.precision: the planner knows {', '.join(PRECISION_BYTES)} and auto, not {precision!r}")
    if activation_checkpointing not in ("none", "full"):
        raise ConfigError(f"train.activation_checkpointing: {activation_checkpointing!r}; choose none or full")
    for name, value in (("micro_batch", micro_batch), ("seq_len", seq_len), ("data_parallel", data_parallel),
                        ("expert_parallel", expert_parallel)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    skeleton = build_skeleton(model)
    expert_params = sum(p.numel() for m in skeleton.modules() if isinstance(m, Experts) for p in m.parameters())
    n_experts = {m.n_experts for m in skeleton.modules() if isinstance(m, Experts)}
    if any(n % expert_parallel for n in n_experts):
        raise ConfigError(f"train.parallel.expert_parallel={expert_parallel} does not divide the experts of every "
                          f"MoE layer ({', '.join(map(str, sorted(n_experts)))})")
    other_params = skeleton.num_parameters() - expert_params
    world = data_parallel * expert_parallel
    held = other_params / (world if fsdp else 1) + expert_params / expert_parallel / (data_parallel if fsdp else 1)
    held = math.ceil(held)
    p_bytes, g_bytes, m_bytes, a_bytes = PRECISION_BYTES[precision]
    per_sequence, fixed = _activation_bytes(skeleton, seq_len, a_bytes, p_bytes, precision.endswith("mixed"),
                                            activation_checkpointing, expert_row_align)
    layout = {"dp": data_parallel, "ep": expert_parallel, "fsdp": fsdp, "activation_checkpointing":
              activation_checkpointing, "precision": precision, "micro_batch": micro_batch, "seq_len": seq_len}
    notes = []
    if fsdp:
        notes.append("FSDP also gathers one block's full parameters (and gradients) at a time: "
                     f"{format_bytes(_largest_block_params(skeleton) * a_bytes)} in flight")
    return MemoryPlan(layout, held, held * p_bytes, held * g_bytes, 2 * held * m_bytes,
                      math.ceil(per_sequence * micro_batch + fixed), per_sequence, fixed, notes)


def plan_from_config(config, micro_batch: int | None = None) -> MemoryPlan:
    """:func:`plan_memory` for a run config: ``train.batch_size`` sequences of ``train.data.seq_len`` per rank, its
    precision and activation checkpointing, and ``train.parallel.{expert_parallel, fsdp}`` where the config
    has that section; data parallelism is the world size (``devices x num_nodes``) over ``expert_parallel``."""
    train = config.train
    parallel = getattr(train, "parallel", None)
    expert_parallel = getattr(parallel, "expert_parallel", 1)
    devices = train.trainer.devices
    per_node = len(devices) if isinstance(devices, list) else int(devices) if str(devices).isdigit() else 1
    world = per_node * train.trainer.num_nodes
    if world % expert_parallel:
        raise ConfigError(f"train.parallel.expert_parallel={expert_parallel} does not divide the world size {world} "
                          "(train.trainer.devices x train.trainer.num_nodes)")
    model = config.model if config.model.vocab_size is not None else _with_vocab(config.model, train.data)
    return plan_memory(model, micro_batch or train.batch_size, train.data.seq_len, world // expert_parallel,
                       expert_parallel, bool(getattr(parallel, "fsdp", False)), train.activation_checkpointing,
                       str(train.precision))


def parse_bytes(text: str) -> float:
    """``"80GB"``, ``"80 GiB"``, ``"512MB"``, ``"1e9"`` -> bytes (GB and GiB both 2^30, as device memory is quoted)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B)?\s*", text)
    if not match:
        raise ConfigError(f"--plan-memory: {text!r} is not a size such as 80GB, 24GiB or 512MB")
    return float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " ")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------- activations


def _activation_bytes(model: nn.Module, seq_len: int, a_bytes: int, p_bytes: int, mixed: bool,
                      activation_checkpointing: str, expert_row_align: int) -> tuple[float, int]:
    """(bytes per sequence, fixed bytes) saved for backward by one forward of ``model`` (a meta skeleton)."""
    dtype = _META_DTYPES[a_bytes]
    d = model.config.d_model
    stream = torch.finfo(_META_DTYPES[p_bytes]).bits // 8  # the residual stream keeps the parameters' dtype
    blocks = [b for b in model.modules() if isinstance(b, Block)]
    traced: dict[str, float] = {}
    per_block = []
    for block in blocks:
        key = repr(block)  # layers of one structure save the same
        if key not in traced:
            traced[key] = _block_bytes(block, d, seq_len, dtype)
        per_block.append(traced[key])
    # Autocast saves a 16-bit copy of every matmul weight, once per step (a recomputed block's only meanwhile).
    casts = [2 * _matmul_weights(block) if mixed else 0 for block in blocks]
    # Padding rows (on average half an alignment per expert) are saved like routed rows, once per micro-batch.
    casts = [c + _padding_bytes(block, expert_row_align, a_bytes) for c, block in zip(casts, blocks)]
    if activation_checkpointing == "full":
        layers = len(blocks) * seq_len * d * stream + max(per_block, default=0)
        casts = max(casts, default=0)
    else:
        layers, casts = sum(per_block), sum(casts)
    # Outside the blocks: token ids, the final norm's input and statistics, the fused head loss's input gradient
    # (float32) and, once per step, its weight gradient (zoo.model.losses.linear_cross_entropy).
    rest = seq_len * (8 + d * stream + 4 + d * 4)
    if model.mtp is not None:
        rest += model.mtp.depth * seq_len * (2 * d * stream + 2 * d * 4 + 8)
    fixed = model.config.vocab_size * d * 4 + casts
    return layers + rest, fixed


def _block_bytes(block: Block, d: int, seq_len: int, dtype: torch.dtype) -> float:
    """Bytes one sequence saves in ``block``: its norms, mixer and dense FFN traced on the meta device, a MoE
    FFN's router and routed experts counted per token."""
    x = torch.empty(1, seq_len, d, device="meta", dtype=dtype, requires_grad=True)
    moe = block.ffn if isinstance(block.ffn, MoE) else None
    pieces = [block.mixer_norm, block.mixer, block.ffn_norm]
    if moe is None:
        pieces.append(block.ffn)
    else:
        pieces += [m for m in (moe.shared, moe.shared_gate) if m is not None]
    total = 0.0
    for piece in pieces:
        total += _traced_bytes(piece.to(dtype), x)
    if moe is not None:
        total += _routed_bytes(moe, seq_len, torch.finfo(dtype).bits // 8)
    return total


def _traced_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in ``module(x)`` (parameters excluded), on meta tensors."""
    params = {p.untyped_storage()._cdata for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FlashAttention():
        module(x)
    return sum(saved.values())


class _FlashAttention(TorchFunctionMode):
    """Runs ``scaled_dot_product_attention`` as the fused kernel training uses (it saves q, k, v, the output and
    the log-sum-exp: FlashAttention, Dao et al. 2022, §3.1), where meta tensors would take the math path that
    saves the ``T x T`` probabilities."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        if kwargs.get("enable_gqa") and k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, is_causal=kwargs.get("is_causal", False), attn_mask=kwargs.get("attn_mask"))[0]


def _routed_bytes(moe: MoE, seq_len: int, a_bytes: int) -> float:
    """What one sequence's routed experts save: :func:`_row_bytes` per routed row (``top_k`` per token, balanced
    and dropless), and per token the router's float32 input, logits and scores."""
    experts, d = moe.experts, moe.router.weight.shape[1]
    router = seq_len * (4 * d + 3 * 4 * experts.n_experts)
    return seq_len * moe.config.top_k * _row_bytes(experts, a_bytes) + router


def _padding_bytes(block: Block, align: int, a_bytes: int) -> float:
    if not isinstance(block.ffn, MoE) or align == 1:
        return 0.0
    experts = block.ffn.experts
    return experts.n_experts * (align - 1) / 2 * _row_bytes(experts, a_bytes)


def _row_bytes(experts: Experts, a_bytes: int) -> int:
    """Bytes the grouped-GEMM node saves per routed row: gathered input, gate/up output, ``silu(gate)``, product,
    output (zoo.blocks.experts), token index (int64) and gate weight (float32)."""
    d, hidden = experts.down_proj.shape[-2:]
    return a_bytes * (d + 2 * hidden + hidden + hidden + d) + 8 + 4


def _matmul_weights(block: Block) -> int:
    linears = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
    return linears + sum(p.numel() for m in block.modules() if isinstance(m, Experts) for p in m.parameters())


def _largest_block_params(model: nn.Module) -> int:
    return max((sum(p.numel() for p in b.parameters()) for b in model.modules() if isinstance(b, Block)), default=0)


def _with_vocab(model: ModelConfig, data) -> ModelConfig:
    """``model`` with the vocabulary its tokenizer will give it (256 bytes + <|endoftext|>, or the BPE size)."""
    return replace(model, vocab_size=data.bpe_vocab_size if data.tokenizer == "bpe" else 257)
