"""zoo tensors -> transformers tensors: the inverse of :mod:`zoo.checkpoint.importers`, function for function.

Each function here undoes the importer function of the same name in :mod:`zoo.checkpoint.importers.common`
(and :mod:`~zoo.checkpoint.importers.deepseek`): a fused zoo tensor is split back along the rows it was
concatenated on, packed experts are unpacked into transformers' per-expert tensors (the layout
``save_pretrained`` writes), DeepSeek's rope rows are interleaved again. Splits are views copied once, so
an import followed by an export returns the original tensors bit for bit. Tensors are *taken* from the zoo
state dict (:meth:`ZooTensors.take`), so a tensor no mapping consumed is reported by name, never dropped.
"""

from __future__ import annotations

import torch

from zoo.errors import CheckpointError


class ZooTensors:
    """A zoo state dict consumed by name into a transformers one; :meth:`finish` reports leftovers."""

    def __init__(self, state_dict: dict[str, torch.Tensor], family: str):
        self.zoo, self.family = dict(state_dict), family
        self.hf: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> torch.Tensor:
        if name not in self.zoo:
            raise CheckpointError(f"the zoo model lacks the tensor {name!r} that the {self.family} export needs")
        return self.zoo.pop(name)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.hf[name] = tensor

    def move(self, zoo_name: str, hf_name: str) -> None:
        self.put(hf_name, self.take(zoo_name))

    def split(self, zoo_name: str, hf_names: list[str], sizes: list[int]) -> None:
        """One fused zoo tensor into several transformers ones, along the output rows (dim 0)."""
        for name, part in zip(hf_names, self.take(zoo_name).split(sizes, dim=0), strict=True):
            self.put(name, part.clone())

    def finish(self) -> dict[str, torch.Tensor]:
        if self.zoo:
            raise CheckpointError(f"the {self.family} export does not map the zoo tensors {sorted(self.zoo)}")
        return self.hf


def embeddings_and_head(t: ZooTensors, tied: bool) -> None:
    """Embedding, final norm and output head (a tied head is stored once, as the embedding, in both formats)."""
    t.move("embed.weight", "model.embed_tokens.weight")
    t.move("norm.weight", "model.norm.weight")
    if not tied:
        t.move("head.weight", "lm_head.weight")


def layer_norms(t: ZooTensors, i: int) -> None:
    t.move(f"blocks.{i}.mixer_norm.weight", f"model.layers.{i}.input_layernorm.weight")
    t.move(f"blocks.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight")


def gqa_attention(t: ZooTensors, i: int, bias: bool, q_dim: int, kv_dim: int, qk_norm: bool = False) -> None:
    """zoo's fused ``qkv`` (rows q, then k, then v) -> q/k/v projections; ``out`` -> o; with ``qk_norm`` the
    q and k norms (OLMoE's over the projections, Qwen3's per head: the same names)."""
    src, dst = f"blocks.{i}.mixer", f"model.layers.{i}.self_attn"
    for kind in ("weight", "bias") if bias else ("weight",):
        t.split(f"{src}.qkv.{kind}", [f"{dst}.{p}_proj.{kind}" for p in "qkv"], [q_dim, kv_dim, kv_dim])
    t.move(f"{src}.out.weight", f"{dst}.o_proj.weight")
    if qk_norm:
        t.move(f"{src}.q_norm.weight", f"{dst}.q_norm.weight")
        t.move(f"{src}.k_norm.weight", f"{dst}.k_norm.weight")


def attention_layers(t: ZooTensors, attention, d_model: int, n_layers: int, tie_embeddings: bool):
    """The embeddings and head, then each layer's norms and GQA attention (``attention``: the layers' attention
    options); yields each layer index for the family's FFN mapping."""
    head_dim = attention.dim_per_head(d_model)
    embeddings_and_head(t, tie_embeddings)
    for i in range(n_layers):
        layer_norms(t, i)
        gqa_attention(t, i, attention.qkv_bias, attention.n_heads * head_dim, attention.kv_heads * head_dim,
                      attention.qk_norm)
        yield i


def swiglu(t: ZooTensors, src: str, dst: str, bias: bool = False) -> None:
    """zoo's fused ``gate_up`` (gate rows first) and ``down`` -> gate_proj/up_proj/down_proj."""
    for kind in ("weight", "bias") if bias else ("weight",):
        fused = f"{src}.gate_up.{kind}"
        half = t.zoo[fused].shape[0] // 2
        t.split(fused, [f"{dst}.gate_proj.{kind}", f"{dst}.up_proj.{kind}"], [half, half])
        t.move(f"{src}.down.{kind}", f"{dst}.down_proj.{kind}")


def experts(t: ZooTensors, src: str, dst: str, names: tuple[str, str, str]) -> None:
    """zoo's packed ``gate_up_proj (E, 2I, d)`` and ``down_proj (E, d, I)`` -> per-expert
    ``{dst}.{e}.{gate}/{up}/{down}.weight`` (``names``: w1/w3/w2 for Mixtral, else gate_proj/up_proj/down_proj)."""
    gate, up, down = names
    gate_up, down_proj = t.take(f"{src}.gate_up_proj"), t.take(f"{src}.down_proj")
    half = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        t.put(f"{dst}.{e}.{gate}.weight", gate_up[e, :half].clone())
        t.put(f"{dst}.{e}.{up}.weight", gate_up[e, half:].clone())
        t.put(f"{dst}.{e}.{down}.weight", down_proj[e].clone())


def interleave(weight: torch.Tensor, groups: int, group_rows: int, rope_start: int) -> torch.Tensor:
    """The inverse of :func:`zoo.checkpoint.importers.deepseek._deinterleave`: the rope rows ``rope_start:`` of
    each of ``groups`` row groups from halves (rows 0..r/2-1 then r/2..r-1) back to interleaved pairs."""
    w = weight.view(groups, group_rows, -1)
    rope = w[:, rope_start:]
    half = rope.shape[1] // 2
    pairs = torch.stack((rope[:, :half], rope[:, half:]), dim=2).flatten(1, 2)
    return torch.cat((w[:, :rope_start], pairs), dim=1).reshape(weight.shape)
