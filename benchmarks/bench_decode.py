"""Decoding cost per generated token: retention's recurrent state vs attention's KV cache.

Two models of equal width and depth (d_model 256, 4 layers, vocab 257): ``retnet-tiny``-shaped
(retention, 4 heads) and ``dense-tiny``-shaped (GQA attention, 8 query / 4 K/V heads), float32,
``torch.inference_mode``. For each context length and batch size the decoding states are put at
that context — the KV caches filled with random keys and values, the recurrent states with random
values (a step's cost depends on how much context there is, not on its contents; prefilling 16k
tokens would only slow the benchmark down) — and then one token at a time is fed exactly as
``model.generate`` does. The peer of the whole attention model is transformers' ``LlamaForCausalLM`` of
the same shape with its default ``DynamicCache``, filled the same way and fed the same way. Per-token times
are medians over alternating repeats (retention, attention, transformers, retention, ...) of ``steps``
tokens each.

Run from the repository root: ``python -m benchmarks.bench_decode [--quick]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import zoo
from benchmarks._common import RESULTS, alternate, print_table, save, scaled, summary, table

VOCAB = 257
MODELS = {"retention": "retnet-tiny", "attention": "dense-tiny"}
PEER = "transformers model"  # transformers' Llama of the attention model's shape, whole model only
PARTS = ("model", "mixer")


def build(preset: str, max_len: int):
    config = zoo.load_config(preset, {"model.vocab_size": VOCAB, "model.max_seq_len": max_len})
    return zoo.build_model(config).eval()


def states_at(model, batch: int, context: int, max_len: int) -> list:
    """Per-layer decoding states holding ``context`` tokens of random content."""
    states = model.init_states(batch, max_len)
    for state in states:
        if hasattr(state, "recurrent"):  # retention
            state.recurrent = torch.randn_like(state.recurrent) * 0.1
        else:  # attention KV cache
            state.k[:, :, :context].normal_()
            state.v[:, :, :context].normal_()
        state.length = context
    return states


def peer_model(max_len: int):
    """transformers' Llama with dense-tiny's shape (d 256, 4 layers, 8 / 4 heads, SwiGLU 704, tied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=max_len,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def peer_decoder(model, batch: int, context: int, steps: int, clock=time.perf_counter):
    """:func:`decoder` for the transformers peer: its ``DynamicCache`` holding ``context`` random K/V."""
    from transformers import DynamicCache

    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        kv = torch.randn(2, batch, config.num_key_value_heads, context, head_dim)
        cache.update(kv[0], kv[1], layer)
    token = torch.randint(0, VOCAB, (batch, 1))

    def run() -> float:
        start = clock()
        with torch.inference_mode():
            for _ in range(steps):
                model(token, cache=cache, use_cache=True)
        return (clock() - start) / steps

    run()
    return run


def decoder(model, batch: int, context: int, steps: int, repeats: int, part: str, clock=time.perf_counter):
    """A timed run of ``steps`` one-token steps through the whole ``model`` or its first layer's mixer."""
    states = states_at(model, batch, context, context + steps * (repeats + 1))
    token = torch.randint(0, VOCAB, (batch, 1))
    x = torch.randn(batch, 1, model.config.d_model)
    mixer = model.blocks[0].mixer

    def run() -> float:
        start = clock()
        with torch.inference_mode():
            for _ in range(steps):
                if part == "model":
                    model(token, states=states)
                else:
                    mixer(x, states[0])
        return (clock() - start) / steps

    run()  # warm-up (also advances the states by `steps` tokens)
    return run


def result_tables(payload: dict, name: str) -> dict:
    """The payload's ``table`` entry (see ``benchmarks/_common.py``), from its figures; the peer of
    retention's recurrent state is attention's KV cache at the same shape."""
    rows = []
    for r in payload["results"]:
        row = [r["batch"], r["context"]]
        for part in PARTS:
            ret, att = r[f"retention {part}"], r[f"attention {part}"]
            row += [scaled(ret, 1e3), scaled(att, 1e3), att["median"] / ret["median"]]
        peer = r.get(PEER)
        row += [scaled(peer, 1e3), peer["median"] / r["attention model"]["median"]] if peer else [None, None]
        rows.append(row)
    columns = ["batch", "context"] + [h for part in PARTS for h in (
        f"retention {part} ms/token", f"attention {part} ms/token", f"attention / retention ({part})")] + [
        "transformers Llama model ms/token", "transformers / zoo attention (model)"]
    return {"table": table(f"Decoding cost per token, float32, {payload['clock']} clock ('mixer': one layer's mixer)",
                           columns, rows), "plots": [f"{name}.png"], "quick": name.endswith("_quick")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="contexts 256 and 1k, batch 1, few steps (seconds)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 gives steadier figures on a busy machine")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (time.process_time), which leaves out the time other "
                             "jobs held the cores; meaningful with --threads 1")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [256, 1024] if args.quick else [256, 1024, 4096, 16384]
    batches = [1] if args.quick else [1, 4]
    steps, repeats = (4, 2) if args.quick else (16, 5)
    max_len = max(contexts) + steps * (repeats + 1)
    models = {name: build(preset, max_len) for name, preset in MODELS.items()}
    peer = peer_model(max_len + steps * (repeats + 1))
    results = []
    for batch in batches:
        for context in contexts:
            runs = {f"{name} {part}": decoder(model, batch, context, steps, repeats, part, clock)
                    for part in PARTS for name, model in models.items()}
            runs[PEER] = peer_decoder(peer, batch, context, steps, clock)
            times = alternate(runs, repeats)
            results.append({"batch": batch, "context": context, **{n: summary(t) for n, t in times.items()}})
            print(f"batch {batch} context {context} done", flush=True)

    print(f"\nms per generated token ({args.clock} clock), d_model 256, 4 layers, float32, "
          f"{torch.get_num_threads()} threads (machine shared with other jobs); 'mixer': one layer's mixer alone")
    med = lambda r, key: r[key]["median"] * 1e3  # noqa: E731
    rows = [[r["batch"], r["context"]] + [v for part in PARTS for v in (
        med(r, f"retention {part}"), med(r, f"attention {part}"), med(r, f"attention {part}") / med(r, f"retention {part}"))]
        + [med(r, PEER), med(r, PEER) / med(r, "attention model")] for r in results]
    print_table(["batch", "context"] + [h for part in PARTS for h in (
        f"retention {part} ms", f"attention {part} ms", "attn / ret")] + ["hf model ms", "hf / zoo attn"], rows)
    goals = {}
    for batch in batches:
        by_ctx = {r["context"]: r for r in results if r["batch"] == batch}
        lo, hi = by_ctx[min(contexts)], by_ctx[max(contexts)]
        for part in PARTS:
            goal = {"retention_flatness": med(hi, f"retention {part}") / med(lo, f"retention {part}"),
                    "attention_over_retention": med(hi, f"attention {part}") / med(hi, f"retention {part}")}
            goals[f"batch{batch} {part}"] = goal
            print(f"batch {batch}, {part}: retention {max(contexts)}/{min(contexts)} = {goal['retention_flatness']:.2f}x "
                  f"(goal <= 1.1); attention/retention at {max(contexts)} = {goal['attention_over_retention']:.1f}x "
                  f"(goal >= 10)")
    name = "bench_decode_quick" if args.quick else "bench_decode"
    payload = {"models": MODELS, "dtype": "float32", "steps": steps, "repeats": repeats, "clock": args.clock,
               "results": results, "goals": goals}
    path = save(name, {**payload, **result_tables(payload, name)})
    plot(results, batches, RESULTS / f"{name}.png", args.clock)
    print(f"\nwrote {path}")


def plot(results: list[dict], batches: list[int], path: Path, clock_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PARTS), figsize=(11, 4))
    for ax, part in zip(axes, PARTS):
        for batch, style in zip(batches, ("-", "--")):
            rows = [r for r in results if r["batch"] == batch]
            for name, marker in (("retention", "o"), ("attention", "s")):
                ax.plot([r["context"] for r in rows], [r[f"{name} {part}"]["median"] * 1e3 for r in rows],
                        marker=marker, linestyle=style, label=f"{name}, batch {batch}")
            if part == "model" and all(PEER in r for r in rows):
                ax.plot([r["context"] for r in rows], [r[PEER]["median"] * 1e3 for r in rows], marker="^",
                        linestyle=style, color="grey", label=f"transformers Llama, batch {batch}")
        contexts = [r["context"] for r in results if r["batch"] == batches[0]]
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="ms per generated token",
               title=f"{'whole model (4 layers)' if part == 'model' else 'one mixer layer'}")
        ax.set_xticks(contexts)
        ax.set_xticklabels([str(c) for c in contexts])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"decoding: retention state vs attention KV cache, d_model 256, CPU float32, {clock_name} clock")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
