"""Importing a transformers Llama checkpoint (~100M parameters, generated here) with ``zoo.from_pretrained``
vs transformers' own ``AutoModelForCausalLM.from_pretrained`` of the same files, and greedy decoding speed;
the way back, ``zoo.export`` of the loaded model vs transformers' ``save_pretrained`` of its own; and the zoo
model inside transformers (``format="zoo"``, ``AutoModelForCausalLM``) decoding with transformers' ``generate``
vs zoo's own ``generate``.

Each load runs in a fresh subprocess (libraries imported before the clock starts), zoo and transformers
alternating, so that time and peak memory (``ru_maxrss`` growth over the process's size after the imports)
are those of the load alone; the time to the first logits (load + one 16-token forward) and a second,
warm load in the same process are timed too. Decoding: batch 1, float32, the same prompt, greedy, ``--new-tokens`` tokens;
both models are loaded in one process and timed alternately. Exports also run in fresh subprocesses, after the
model is loaded; their peak memory is the high-water mark of the export alone (``/proc/self/clear_refs``
resets it after the load). Wrapped decoding: greedy at batch 1 and 8, the same prompts and token count for both.
Reports medians.

    python -m benchmarks.bench_import [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import alternate, bar_plot, print_table, save, summary, table

SHAPE = dict(vocab_size=32000, hidden_size=640, intermediate_size=1728, num_hidden_layers=12,
             num_attention_heads=10, num_key_value_heads=5, max_position_embeddings=2048,
             tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None)
QUICK = dict(SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512)  # plumbing only: a minuscule model


def make_checkpoint(shape: dict, path: Path) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def load(which: str, path: str):
    if which == "zoo":
        import zoo

        return zoo.from_pretrained(path).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure_load(which: str, path: str) -> dict:
    """In this (fresh) process: import the library, then time one load, its peak memory growth, the first
    forward pass after it (lazily mapped weights are paid for there), and a second, warm load."""
    if which == "zoo":
        import zoo  # noqa: F401
    import transformers  # noqa: F401  (imported on both sides: the same baseline)

    before = _rss_kib()
    start = time.perf_counter()
    model = load(which, path)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long))
    first_logits = time.perf_counter() - start
    del model
    start = time.perf_counter()
    load(which, path)
    warm = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": (peak - before) / 1024, "first_logits_s": first_logits, "warm_s": warm}


def load_in_subprocess(which: str, path: Path) -> dict:
    return _subprocess(["--measure-load", which, str(path)])


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_import", *args],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def measure_export(which: str, path: str, out: str) -> dict:
    """In this (fresh) process: load the checkpoint, reset the peak-memory mark, then time one export
    (``zoo.export`` of the zoo model, or transformers' ``save_pretrained`` of its own) and its peak growth."""
    model = load(which, path)
    import zoo  # noqa: F401  (imported on both sides)

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident size
    before = _peak_rss_kib()
    start = time.perf_counter()
    write = (lambda target: zoo.export(model, target)) if which == "zoo" else model.save_pretrained
    write(out)
    seconds = time.perf_counter() - start
    peak = (_peak_rss_kib() - before) / 1024
    start = time.perf_counter()
    write(out + "-again")  # warm: the first write of a process also pays lazy imports (zoo: torch.distributed's DTensor)
    return {"seconds": seconds, "peak_mib": peak, "warm_s": time.perf_counter() - start}


def export_in_subprocess(which: str, path: Path, out: Path) -> dict:
    for target in (out, Path(f"{out}-again")):
        shutil.rmtree(target, ignore_errors=True)
    return _subprocess(["--measure-export", which, str(path), str(out)])


def wrapped_decode_speed(path: Path, vocab_size: int, new_tokens: int, repeats: int, batches=(1, 8)) -> dict:
    """tokens/s of greedy decoding: zoo's ``generate`` vs transformers' ``generate`` on the same zoo model
    exported in zoo's transformers form and loaded with ``AutoModelForCausalLM`` (same weights, same states)."""
    import zoo
    from transformers import AutoModelForCausalLM

    own = zoo.from_pretrained(path).eval()
    with tempfile.TemporaryDirectory() as tmp:
        zoo.export(own, tmp, format="zoo")
        wrapped = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    result = {}
    for batch in batches:
        prompt = torch.randint(0, vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch))
        outputs = {}

        def run(name, prompt=prompt, outputs=outputs):
            def once():
                start = time.perf_counter()
                with torch.no_grad():
                    if name == "zoo generate":
                        outputs[name] = own.generate(prompt, max_new_tokens=new_tokens)
                    else:
                        outputs[name] = wrapped.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                         do_sample=False, pad_token_id=0)
                return prompt.shape[0] * new_tokens / (time.perf_counter() - start)
            return once

        names = ("zoo generate", "transformers generate (zoo model)")
        for name in names:  # warm-up
            run(name)()
        speeds = alternate({name: run(name) for name in names}, repeats)
        result[batch] = {"tokens_per_s": {k: summary(v) for k, v in speeds.items()},
                         "same_tokens": torch.equal(*outputs.values())}
    return result


def decode_speed(path: Path, vocab_size: int, new_tokens: int, repeats: int) -> dict:
    models = {"zoo": load("zoo", str(path)), "transformers": load("transformers", str(path))}
    prompt = torch.randint(0, vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    outputs = {}

    def run(name):
        def once():
            start = time.perf_counter()
            with torch.no_grad():
                if name == "zoo":
                    out = models[name].generate(prompt, max_new_tokens=new_tokens)
                else:
                    out = models[name].generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                                                pad_token_id=0)
            outputs[name] = out
            return new_tokens / (time.perf_counter() - start)
        return once

    for name in models:  # warm-up
        run(name)()
    speeds = alternate({name: run(name) for name in models}, repeats)
    same = torch.equal(outputs["zoo"], outputs["transformers"])
    return {"tokens_per_s": {k: summary(v) for k, v in speeds.items()}, "same_tokens": same}


def result_tables(result: dict) -> dict:
    """The payload's ``table`` and ``tables`` entries (see ``benchmarks/_common.py``), from its figures; peer:
    transformers (its load and decode; its ``save_pretrained``; zoo's own ``generate`` for the wrapped model)."""
    peer = result["decode"]["transformers"]["median"]
    rows = [[name, *(load[key] for key in ("seconds", "first_logits_s", "warm_s", "peak_mib")),
             result["decode"][name], result["decode"][name]["median"] / peer] for name, load in result["load"].items()]
    export_peer = result["export"]["transformers"]["seconds"]["median"]
    export_rows = [[name, e["seconds"], e["warm_s"], e["peak_mib"], e["seconds"]["median"] / export_peer]
                   for name, e in result["export"].items()]
    decode_rows = [[batch, name, speed, speed["median"] / speeds["tokens_per_s"]["zoo generate"]["median"],
                    speeds["same_tokens"]]
                   for batch, speeds in result["wrapped_decode"].items() for name, speed in speeds["tokens_per_s"].items()]
    size = f"{result['parameters'] / 1e6:.1f} M-parameter"
    return {"table": table(f"Loading a {size} transformers Llama checkpoint, "
                           f"greedy decoding (identical tokens: {result['same_tokens']})",
                           ["library", "load s", "load + 1st forward s", "warm reload s", "load peak MiB",
                            "greedy tokens/s (batch 1)", "decode vs transformers"], rows),
            "tables": [table(f"Writing the {size} Llama back as a transformers checkpoint (zoo.export vs "
                             "transformers' save_pretrained, fresh processes)",
                             ["writer", "first write s", "second write s", "peak MiB over the loaded model",
                              "first write vs transformers"], export_rows),
                       table(f"The {size} zoo model inside transformers (format='zoo', AutoModelForCausalLM): "
                             f"greedy decoding, {result['new_tokens']} new tokens",
                             ["batch", "decoder", "tokens/s", "vs zoo generate", "identical tokens"], decode_rows)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a minuscule 2-layer model, one repeat, 4 new tokens")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--measure-load", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--measure-export", nargs=3, metavar=("WHICH", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_load:
        print(json.dumps(measure_load(*args.measure_load)))
        return
    if args.measure_export:
        print(json.dumps(measure_export(*args.measure_export)))
        return
    shape = QUICK if args.quick else SHAPE
    repeats = args.repeats or (1 if args.quick else 5)
    new_tokens = args.new_tokens or (4 if args.quick else 64)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama"
        n_params = make_checkpoint(shape, path)
        print(f"transformers Llama checkpoint: {n_params / 1e6:.1f}M parameters, float32, {path}")
        loads = alternate({name: lambda name=name: load_in_subprocess(name, path)
                           for name in ("zoo", "transformers")}, repeats)
        decoding = decode_speed(path, shape["vocab_size"], new_tokens, repeats)
        exports = alternate({name: lambda name=name: export_in_subprocess(name, path, Path(tmp) / f"export-{name}")
                             for name in ("zoo", "transformers")}, repeats)
        wrapped = wrapped_decode_speed(path, shape["vocab_size"], new_tokens, repeats)
    rows, result = [], {"parameters": n_params, "shape": shape, "repeats": repeats, "new_tokens": new_tokens,
                        "same_tokens": decoding["same_tokens"], "load": {}, "decode": decoding["tokens_per_s"],
                        "export": {name: {key: summary([r[key] for r in runs]) for key in ("seconds", "warm_s", "peak_mib")}
                                   for name, runs in exports.items()},
                        "wrapped_decode": wrapped}
    for name, runs in loads.items():
        result["load"][name] = {key: summary([r[key] for r in runs])
                                for key in ("seconds", "peak_mib", "first_logits_s", "warm_s")}
        rows.append([name, *(result["load"][name][key]["median"]
                             for key in ("seconds", "first_logits_s", "warm_s", "peak_mib")),
                     decoding["tokens_per_s"][name]["median"]])
    print_table(["library", "load s", "load + 1st forward s", "warm reload s", "load peak MiB",
                 "greedy tokens/s (b=1)"], rows)
    print(f"greedy outputs identical: {decoding['same_tokens']}")
    tables = result_tables(result)["tables"]
    for t in tables:
        print(f"\n{t['title']}")
        print_table(t["columns"], [[c["median"] if isinstance(c, dict) else c for c in row] for row in t["rows"]])
    result["quick"] = args.quick
    name = "bench_import" + ("_quick" if args.quick else "")
    result["plots"] = [bar_plot(name, f"importing a {n_params / 1e6:.1f} M-parameter transformers Llama checkpoint",
                                [("load (fresh process)", "seconds", {k: v["seconds"] for k, v in result["load"].items()}),
                                 ("load peak memory", "MiB", {k: v["peak_mib"] for k, v in result["load"].items()}),
                                 ("greedy decoding, batch 1", "tokens/s", result["decode"]),
                                 ("export (fresh process)", "seconds", {k: v["seconds"] for k, v in result["export"].items()}),
                                 *((f"zoo model in transformers, batch {b}", "tokens/s", w["tokens_per_s"])
                                   for b, w in wrapped.items())])]
    print(f"wrote {save(name, {**result, **result_tables(result)})}")


if __name__ == "__main__":
    main()
