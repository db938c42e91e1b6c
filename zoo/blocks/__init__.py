"""Built-in blocks; importing this package registers them.

Block contracts (see ``zoo.registry`` for how blocks are registered and built):

* ``mixer``: ``forward(x, state=None) -> y`` with ``x, y: (B, T, d_model)``, causal in T.
  ``init_state(batch_size, max_len, device, dtype)`` returns the mixer's own decoding state (a KV
  cache for attention, a recurrent state for retention), which ``forward`` advances in place.
* ``ffn``: ``forward(x, aux) -> y`` position-wise; ``aux`` is the :class:`zoo.blocks.auxiliary.AuxCollector` through
  which a block adds weighted auxiliary losses and routing statistics.
* ``norm``: ``forward(x) -> y`` over the last dimension ``d_model``.
* ``dispatcher``: ``forward(x, routing, experts, capacity) -> y`` moves a MoE layer's routed tokens to
  its experts and combines their outputs (:mod:`zoo.blocks.dispatch`, which says how an expert-parallel
  all-to-all dispatcher plugs in); built as ``Dispatcher(config)``, assigned as ``moe.dispatcher``.

Any module may also define ``on_optimizer_step(all_reduce)``: the trainer calls it once after each
optimizer step (so after a whole accumulated batch), with ``all_reduce(tensor) -> tensor`` summing a
tensor over data-parallel ranks (the identity on one process). Blocks update non-gradient state there,
e.g. the loss-free balancing bias of a MoE layer from the expert loads it counted since the last step.
Such a module keeps what its forward counts in its own buffers: when ``train.skip_nonfinite`` skips a
batch, the trainer restores those buffers as they were before that batch's forward.
"""

from zoo.blocks import attention, dispatch, mla, mlp, moe, norm, retention  # noqa: F401
