"""The model card (``README.md``) a checkpoint carries on the Hub."""

from __future__ import annotations

from typing import Mapping

from huggingface_hub import ModelCard, ModelCardData


def model_card(model, training: Mapping | None = None, license: str = "apache-2.0") -> str:
    """A Hub model card: YAML metadata (``library_name: zoo``, block-family tags, license) and a body with
    the architecture, total and active parameter counts, and what ``training`` says of the run (``name``,
    ``corpus``, ``tokenizer``, ``seq_len``, ``steps``, ``val_loss``; unknown where absent)."""
    m = model.config
    training = dict(training or {})
    blocks = [m.layer_blocks(i) for i in range(m.n_layers)]
    mixers = sorted({mixer.type for mixer, _ in blocks})
    ffns = sorted({ffn.type for _, ffn in blocks})
    data = ModelCardData(library_name="zoo", license=license, pipeline_tag="text-generation",
                         tags=["zoo", *(f"mixer-{t}" for t in mixers), *(f"ffn-{t}" for t in ffns)])
    total, active = model.num_parameters(), model.num_parameters(active=True)

    def spec(block) -> str:
        options = {k: v for k, v in block.to_dict().items() if k != "type"}
        return f"`{block.type}` " + ", ".join(f"{k}={v}" for k, v in options.items())

    rows = [("vocab_size", m.vocab_size), ("d_model", m.d_model), ("n_layers", m.n_layers),
            ("max_seq_len", m.max_seq_len), ("tie_embeddings", m.tie_embeddings), ("norm", spec(m.norm)),
            ("mixer", spec(m.mixer)), ("ffn", spec(m.ffn))]
    rows += [(f"layer {i}", ", ".join(spec(b) for b in (o.mixer, o.ffn) if b is not None))
             for i, o in sorted(m.layers.items())]
    if m.mtp is not None:
        rows.append(("mtp", f"depth={m.mtp.depth}, heads={m.mtp.heads}, loss_weight={m.mtp.loss_weight} "
                            "(multi-token prediction; `zoo.from_pretrained(..., drop_mtp=True)` leaves it out)"))
    steps, val_loss = training.get("steps"), training.get("val_loss")
    data_line = (f"- corpus: `{training['corpus']}`, tokenizer `{training.get('tokenizer', 'unknown')}`, "
                 f"sequence length {training.get('seq_len', 'unknown')}" if "corpus" in training
                 else "- corpus: unknown")
    lines = [
        f"# {training.get('name') or 'zoo model'}", "",
        "A decoder-only language model built with zoo from interchangeable blocks.", "",
        "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        f"Parameters: {total:,} total, {active:,} active per token.", "",
        "## Training", "",
        data_line,
        f"- steps: {steps if steps is not None else 'unknown'}",
        f"- final validation loss: {f'{val_loss:.4f}' if val_loss is not None else 'unknown'}", "",
        "## Use", "", "```python", "import zoo", "", 'model = zoo.from_pretrained("<repo_id or path>")', "```", "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))
