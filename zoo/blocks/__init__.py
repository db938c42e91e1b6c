"""Built-in blocks; importing this package registers them.

Block contracts (see ``zoo.registry`` for how blocks are registered and built):

* ``mixer``: ``forward(x, state=None) -> y`` with ``x, y: (B, T, d_model)``, causal in T.
  ``init_state(batch_size, max_len, device, dtype)`` returns the mixer's own decoding state (a KV
  cache for attention, a recurrent state for retention), which ``forward`` advances in place.
* ``ffn``: ``forward(x, aux) -> y`` position-wise; ``aux`` is the :class:`zoo.aux.AuxCollector` through
  which a block adds weighted auxiliary losses and routing statistics.
* ``norm``: ``forward(x) -> y`` over the last dimension ``d_model``.
"""

from zoo.blocks import attention, mlp, norm  # noqa: F401
