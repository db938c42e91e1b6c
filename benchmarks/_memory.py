"""The measured memory of one training step on CPU, in the parts ``zoo.train.plan`` plans: gradients, optimizer
state, activations, and their peak together.

Why not the process's resident size: ``ru_maxrss`` only ever rises, counts the interpreter, lazily imported
modules, compiled code and the allocator's retained pages, and a first step that imports anything (Lightning,
Dynamo) buries the tensors under that. Here every import, the optimizer state's creation and (for compiled
blocks) the compilation happen in warm-up steps before the measured window; the window is one step under
``torch.profiler`` with ``profile_memory=True``, which records every allocation and free of the CPU allocator
(address, signed size, time), i.e. the tensors' own bytes, nothing else. Replaying those records gives the bytes
live at every moment of the step:

- **gradients**: the allocations still alive when the step ends at the addresses of the parameters' ``.grad``
  (the gradients are dropped, ``set_to_none``, before the window, so the step allocates them all);
- **activations**: the most bytes live at any moment of the step apart from those gradients -- the tensors
  autograd saves for backward, with a checkpointed block's recomputed ones, plus the step's transient buffers
  (the planner does not model the transient ones, so they count as its error);
- **saved**: the bytes live (gradients apart) when backward starts, i.e. what the forward left for backward: the
  saved activations of the planner's model without their checkpointed blocks' recomputation and transients;
- **optimizer state**: AdamW's moments, allocated in the warm-up step, counted from ``optimizer.state``;
- **peak**: optimizer state plus the most bytes live at any moment of the step (gradients and activations
  overlap only in backward, where activations are being freed while gradients appear; the planner adds them).

Frees of blocks allocated before the window are not recorded (the profiler does not know their size); the
step leaves nothing else alive, which ``unaccounted_bytes`` (bytes alive at the end that are not gradients)
shows.
"""

from __future__ import annotations

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def _allocations(prof) -> tuple[list[tuple[int, int, int]], int]:
    """``(time ns, address, signed bytes)`` of every CPU allocation (+) and free (-) the profiler recorded, and
    when the first backward node ran (the autograd engine's ``evaluate_function`` ranges)."""
    events, backward, stack = [], None, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
        elif node.name.startswith("autograd::engine::evaluate_function"):
            backward = min(backward or node.start_time_ns, node.start_time_ns)
        stack.extend(node.children)
    if backward is None:
        raise RuntimeError("the profiled step ran no backward")
    return sorted(events), backward


def step_memory(step, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Run ``step()`` (forward, backward, ``optimizer.step()`` of ``model``) once under the profiler and return
    its measured ``gradient_bytes``, ``optimizer_bytes``, ``activation_bytes``, ``saved_bytes``, ``peak_bytes`` and
    ``unaccounted_bytes`` (see the module docstring). Call it after a warm-up step."""
    optimizer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, backward = _allocations(prof)
    grads = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    # which allocation at a gradient's address is the gradient: the last one there, never freed
    last_at: dict[int, int] = {}
    for i, (_, ptr, size) in enumerate(events):
        if size > 0:
            last_at[ptr] = i
        else:
            last_at.pop(ptr, None)
    gradient_events = {i for ptr, i in last_at.items() if ptr in grads}
    live = gradient = peak = activations = saved = 0
    for i, (time, _, size) in enumerate(events):
        live += size
        gradient += size if i in gradient_events else 0
        peak, activations = max(peak, live), max(activations, live - gradient)
        saved = live - gradient if time < backward else saved
    state = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
             for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)}
    step_counters = sum(t.untyped_storage().nbytes() for s in optimizer.state.values()
                        for k, t in s.items() if k == "step" and torch.is_tensor(t))
    optimizer_bytes = sum(state.values()) - step_counters  # the planner's part is the two moments
    return {"gradient_bytes": gradient, "optimizer_bytes": optimizer_bytes, "activation_bytes": activations,
            "saved_bytes": saved,
            "peak_bytes": optimizer_bytes + peak, "unaccounted_bytes": live - gradient}
