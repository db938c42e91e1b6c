"""Built-in blocks; importing this package registers them.

Block contracts (see ``zoo.registry`` for how blocks are registered and built):

* ``mixer``: ``forward(x, state=None) -> y`` with ``x, y: (B, T, d_model)``, causal in T.
  ``init_state(batch_size, max_len, device, dtype)`` returns the mixer's own decoding state, a
  :class:`zoo.blocks.state.DecodingState` (a KV cache for attention, a recurrent state for retention):
  ``forward(x, state)`` advances it in place by ``T`` positions, and decoders roll it back with
  ``snapshot()``/``restore()`` (and ``rewind(n)`` where ``can_rewind``), never with anything else.
  Padding reaches a mixer through its state only: where ``state.left_pad`` is set (left-padded batches of
  prompts), the mixer takes rotary positions from ``state.positions()`` (0 at each row's first real
  token) and must keep pad positions out of every real position's output, using ``state.real_keys(n)``
  (attention masks pad keys; a recurrent state takes nothing in from a pad), so that each row decodes
  exactly as it would alone. Without a state there is no padding.
  A state may hold positions the mixer never computed, and the mixer treats them as any earlier positions: the
  prefix-tuning hook (:mod:`zoo.adapters.prefix`) subclasses a mixer so that its ``init_state`` returns a state
  already holding learned keys/values (KV caches: post-RoPE keys; MLA: latents and rope keys) or a learned
  recurrent matrix (retention), and its ``forward(x)`` without a state runs ``forward(x, such a state)``.
* ``ffn``: ``forward(x, aux) -> y`` position-wise; ``aux`` is the :class:`zoo.blocks.auxiliary.AuxCollector` through
  which a block adds weighted auxiliary losses and routing statistics.
* ``norm``: ``forward(x) -> y`` over the last dimension ``d_model``.
* ``dispatcher``: ``forward(x, routing, experts, capacity) -> y`` moves a MoE layer's routed tokens to
  its experts and combines their outputs (:mod:`zoo.blocks.dispatch`, which says how an expert-parallel
  all-to-all dispatcher plugs in); built as ``Dispatcher(config)``, assigned as ``moe.dispatcher``.

Construction and initialisation are apart. A constructor only allocates (``torch.empty``) and stores the
init scales it needs from its :class:`zoo.registry.BlockContext` (``init_std``, ``residual_init_std``); models
are constructed on the meta device, where nothing can be filled. Every module that holds parameters or
buffers defines ``init_own_weights()``, which fills those it holds itself and those of the plain torch
modules it holds directly (its ``nn.Linear`` children: their own ``reset_parameters`` never runs), and
leaves submodules that have the method to themselves. The init pass
(:func:`zoo.model.build.init_weights`) calls it on every module, parents first, under ``torch.no_grad()``;
it also initialises a standalone block: ``init_weights(Attention(config, ctx))``.

Any module may also define ``on_optimizer_step(all_reduce)``: the trainer calls it once after each
optimizer step (so after a whole accumulated batch), with ``all_reduce(tensor) -> tensor`` summing a
tensor over data-parallel ranks (the identity on one process). Blocks update non-gradient state there,
e.g. the loss-free balancing bias of a MoE layer from the expert loads it counted since the last step.
Such a module keeps what its forward counts in its own buffers: when ``train.skip_nonfinite`` skips a
batch, the trainer restores those buffers as they were before that batch's forward.
"""

from zoo.blocks import attention, dispatch, mla, mlp, moe, norm, retention  # noqa: F401
