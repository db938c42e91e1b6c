"""Scale-out under Lightning's ``ModelParallelStrategy``: expert parallelism and FSDP2, applied to a built model
from outside (``train.parallel``; torchtitan's ``parallelize`` functions are the model).

The device mesh is ``(dp, ep)``, ``dp x ep`` = the world size, expert-parallel ranks adjacent (inside a node),
data parallelism across them. Lightning builds it with its own dimension names, ``data_parallel`` (dp) and
``tensor_parallel``, which here holds the expert-parallel ranks. Every rank reads its own micro-batch.

* **Expert parallelism** (``expert_parallel > 1``; GShard, Lepikhin et al. 2020, §2.2): each MoE layer's
  packed expert weights become DTensors sharded on dim 0 over the ep ranks (``n_experts / ep`` experts each)
  and the layer's dispatcher becomes :class:`~zoo.blocks.dispatch.AllToAllDispatcher`. Expert gradients
  already hold the contributions of every ep rank's tokens (the all-to-all's backward brings them); they are
  summed over dp and divided by the world size, so that they are the gradient of the mean loss over all
  ranks' tokens, as the other weights' are.
* **FSDP2** (``fsdp``; ``fully_shard``, ZeRO stage 3 of Rajbhandari et al. 2020, §5: parameters, gradients and
  optimizer state partitioned over the data-parallel ranks): every decoder block, then the root, is sharded over
  all ranks, expert weights under expert parallelism excepted
  (they are sharded by it). Without ``fsdp`` the non-expert weights stay replicated and their gradients are
  averaged over all ranks.
* **Gradient clipping** by the global norm over the shards (:meth:`ParallelPlan.clip_grad_norm_`), as
  ``torch.nn.utils.clip_grad_norm_`` computes it on one process.

Sharded checkpoints (one DCP shard per rank) are Lightning's ``ModelParallelStrategy.save_checkpoint``;
:func:`full_state_dict` gathers the weights for the consolidated export.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from zoo.blocks.dispatch import AllToAllDispatcher, AllToAllDispatcherConfig
from zoo.blocks.moe import MoE
from zoo.errors import ConfigError
from zoo.model.block import Block
from zoo.train.config import ParallelConfig

DP, EP = "data_parallel", "tensor_parallel"  # Lightning's mesh dimension names; zoo's ep ranks are the second


class ZooModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with the ``(dp, ep)`` mesh of ``train.parallel``: ``dp`` is the
    world size divided by ``expert_parallel``, found once the processes are known; checkpoints are sharded."""

    def __init__(self, parallel: ParallelConfig):
        super().__init__(data_parallel_size=1, tensor_parallel_size=parallel.expert_parallel,
                         save_distributed_checkpoint=True)
        self.expert_parallel = parallel.expert_parallel

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        if world % self.expert_parallel:
            raise ConfigError(f"train.parallel.expert_parallel={self.expert_parallel} does not divide the world size "
                              f"{world} ({self.num_processes} devices x {self.num_nodes} nodes): the (dp, ep) device "
                              "mesh needs dp x expert_parallel = world size")
        self._data_parallel_size = world // self.expert_parallel
        super().setup_environment()


@dataclass
class ParallelPlan:
    """What :func:`parallelize` did to a model: the mesh, the expert-parallel weights, and the weights whose
    gradients zoo averages itself (those FSDP does not manage)."""

    mesh: DeviceMesh
    expert_params: list[nn.Parameter] = field(default_factory=list)
    replicated_params: list[nn.Parameter] = field(default_factory=list)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Make every gradient that of the mean loss over all ranks' tokens (call once per optimizer step,
        after the last backward): replicated weights averaged over all ranks; expert weights summed over dp
        and divided by the world size. FSDP reduced its own weights in backward."""
        world = dist.get_world_size()
        _sum_and_divide([p.grad for p in self.replicated_params if p.grad is not None], dist.group.WORLD, world)
        dp = self.mesh[DP]
        _sum_and_divide([local(p.grad) for p in self.expert_params if p.grad is not None],
                        dp.get_group() if dp.size() > 1 else None, world)

    @torch.no_grad()
    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """Scale the gradients so that their global 2-norm (over every shard of every weight) is at most
        ``max_norm``, with ``torch.nn.utils.clip_grad_norm_``'s coefficient ``max_norm / (norm + 1e-6)``;
        returns the norm before clipping."""
        grads = [p.grad for p in parameters if p.grad is not None]
        total = torch.zeros((), dtype=torch.float64, device=self.mesh.device_type)
        sharded: dict[tuple, torch.Tensor] = {}  # squares of the DTensor shards, per mesh and placements
        for grad in grads:
            square = local(grad).double().square().sum()
            if isinstance(grad, DTensor):
                key = (grad.device_mesh, grad.placements)
                sharded[key] = sharded.get(key, 0) + square
            else:
                total += square  # replicated: the same on every rank
        for (mesh, placements), square in sharded.items():
            for dim, placement in enumerate(placements):
                if placement.is_shard():
                    dist.all_reduce(square, group=mesh.get_group(dim))
            total += square
        norm = total.sqrt()
        coefficient = min(1.0, max_norm / (norm.item() + 1e-6))
        if coefficient < 1.0:
            for grad in grads:
                local(grad).mul_(coefficient)
        return norm.float()


def parallelize(model: nn.Module, mesh: DeviceMesh, parallel: ParallelConfig) -> ParallelPlan:
    """Apply ``train.parallel`` to ``model`` (built and initialised identically on every rank) in place:
    expert parallelism over ``mesh``'s ep dimension, then FSDP2 per :class:`~zoo.model.block.Block` and root."""
    plan = ParallelPlan(mesh)
    if parallel.expert_parallel > 1:
        ep_mesh = mesh[EP]
        for module in model.modules():
            if isinstance(module, MoE):
                experts = module.experts
                for name, param in list(experts.named_parameters(recurse=False)):
                    sharded = nn.Parameter(distribute_tensor(param.detach(), ep_mesh, [Shard(0)]),
                                           requires_grad=param.requires_grad)
                    setattr(experts, name, sharded)
                    plan.expert_params.append(sharded)
                module.dispatcher = AllToAllDispatcher(AllToAllDispatcherConfig(), ep_mesh.get_group())
    ignored = set(plan.expert_params)
    if parallel.fsdp:
        world_mesh = init_device_mesh(mesh.device_type, (mesh.size(),))
        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module, mesh=world_mesh, ignored_params=ignored & set(module.parameters()) or None)
        fully_shard(model, mesh=world_mesh, ignored_params=ignored or None)
    else:
        plan.replicated_params = [p for p in model.parameters() if p not in ignored]
    return plan


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU, gathered from every rank's shards (a collective: every rank calls it);
    rank 0 gets the tensors, the others an empty dict."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage); a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _sum_and_divide(tensors: list[torch.Tensor], group: dist.ProcessGroup | None, divisor: int) -> None:
    """Sum ``tensors`` in place over ``group`` (None: this rank alone) in one collective per dtype, then divide
    them by ``divisor``."""
    for dtype in {t.dtype for t in tensors}:
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat /= divisor
        for tensor, chunk in zip(same, flat.split([t.numel() for t in same])):
            tensor.copy_(chunk.view_as(tensor))
