"""DPO after SFT, in miniature (Rafailov et al. 2023): held-out implicit-reward accuracy and margin over DPO steps,
and the SFT model's held-out answer log-probability before and after DPO.

Per seed: dense-tiny pre-trained on ``python-stdlib``, fine-tuned with LoRA on the embedded ``python-docs``
instructions (``sft-tiny``), then aligned with DPO on the ``python-docs`` preference pairs (``dpo-tiny``: the
right docstring summary chosen, a sibling object's rejected; the SFT model is the reference). Held out: the
pairs of modules in neither training split. Reward accuracy starts at 0.5 by construction (the policy is its
reference; ties count one half) and is measured there, with the new adapter disabled. Rafailov et al. report
that DPO raises the chosen response's reward over the rejected one's; the claim tested is that held-out accuracy
rises above 0.5 with a growing margin, and whether the chosen answers' own log-probability rises or falls.
Three seeds (one with ``--quick``): mean and min-max band. Run from the repository root:
``python -m benchmarks.reproduce_dpo [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import tempfile
from pathlib import Path

import torch

from benchmarks._common import plot_path, print_table, save, table
from benchmarks._train import budget, read_metrics, train_preset


def chat_and_preference_files(folder: Path) -> dict[str, str]:
    """Quick mode: the chat and preference JSONL of a handful of stdlib modules (the embedded set's records)."""
    from zoo.train import instructions

    root = Path(sysconfig.get_paths()["stdlib"])
    names = ("json/__init__.py", "shlex.py", "textwrap.py", "fnmatch.py", "glob.py", "bisect.py", "base64.py", "gzip.py")
    modules = instructions.build_records([root / n for n in names], root)
    paths = {}
    for kind, build in (("chat", instructions.chat_records), ("preference", instructions.preference_records)):
        paths[kind] = str(folder / f"{kind}.jsonl")
        Path(paths[kind]).write_text("".join(json.dumps(r) + "\n" for r in build(modules, sorted(modules))))
    return paths


def held_out(module, datamodule) -> dict:
    """Mean held-out reward accuracy and margin of the DPO run's model, and the mean log-probability of the
    held-out chosen answers under the SFT model (the adapter disabled) and after DPO (enabled)."""
    from zoo.adapters import adapter_disabled
    from zoo.train.finetune import sequence_logps

    model, objective = module.model.eval(), module.objective
    records = datamodule.prepare()[1]
    accuracy, margin, before, after = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(records), 8):
            batch = records[list(range(start, min(start + 8, len(records))))]
            B = batch["input_ids"].shape[0] // 2
            policy = sequence_logps(model(batch["input_ids"]).logits, batch["labels"])
            reference = objective.reference_logps(model, batch["input_ids"], batch["labels"])
            with adapter_disabled(model):
                sft = sequence_logps(model(batch["input_ids"]).logits, batch["labels"])
            rewards = objective.config.beta * (policy - reference)
            accuracy += ((rewards[:B] > rewards[B:]).float() + 0.5 * (rewards[:B] == rewards[B:]).float()).tolist()
            margin += (rewards[:B] - rewards[B:]).tolist()
            before += sft[:B].tolist()
            after += policy[:B].tolist()
    return {"reward_accuracy": statistics.mean(accuracy), "reward_margin": statistics.mean(margin),
            "chosen_logp_sft": statistics.mean(before), "chosen_logp_dpo": statistics.mean(after), "pairs": len(margin)}


def one_seed(seed: int, quick: bool, folder: Path) -> dict:
    from zoo.adapters import adapter_disabled
    from zoo.train.chat_data import ChatDataModule

    b = budget(quick)
    common = {"train.seed": seed, "train.sample_tokens": 0, "train.val_batches": b["val_batches"],
              "model.mixer.backend": "eager"}
    pre = train_preset("dense-tiny", {**common, "train.max_steps": b["steps"], "train.batch_size": b["batch_size"],
                             "train.data.seq_len": b["seq_len"], "train.data.corpus": b["corpus"],
                             "train.val_check_interval": b["steps"], "train.checkpoint_every": b["steps"],
                             "train.schedule.warmup_steps": max(1, b["steps"] // 10)}, folder / "pre")
    steps = 6 if quick else 200
    tuned = {**common, "train.max_steps": steps, "train.checkpoint_every": steps, "train.log_every": 1,
             "train.val_check_interval": max(1, steps // 5), "train.schedule.warmup_steps": max(1, steps // 10)}
    files = chat_and_preference_files(folder) if quick else {}
    if quick:
        tuned.update({"train.batch_size": 2, "train.data.seq_len": 64, "train.data.val_fraction": 0.25})
    sft = train_preset("sft-tiny", {**tuned, "train.init_from": str(pre.out_dir), "train.data.path": files.get("chat")},
              folder / "sft")
    dpo = train_preset("dpo-tiny", {**tuned, "train.init_from": str(sft.out_dir / "final"),
                           "train.data.path": files.get("preference")}, folder / "dpo")
    metrics = read_metrics(folder / "dpo" / "metrics.csv")
    data = ChatDataModule(dpo.config)
    final = held_out(dpo.module, data)
    with adapter_disabled(dpo.module.model):  # the start: DPO's fresh adapter computes its base, the reference
        start = held_out(dpo.module, data)
    return {"accuracy_curve": [(0, start["reward_accuracy"])] + metrics["val/reward_accuracy"],
            "margin_curve": [(0, start["reward_margin"])] + metrics["val/reward_margin"],
            "final": final, "sft_val_loss": sft.val_loss, "pretrain_val_loss": pre.val_loss}


def band(values: list[float]) -> dict:
    """A table cell: the mean (under ``median``, the key the results page renders) and the min-max band."""
    return {"median": statistics.mean(values), "mean": statistics.mean(values), "min": min(values), "max": max(values),
            "values": values}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "accuracy_curve", "held-out reward accuracy"),
                           (axes[1], "margin_curve", "held-out reward margin")):
        steps = [s for s, _ in results[0][key]]
        values = torch.tensor([[v for _, v in r[key]] for r in results])
        ax.plot(steps, values.mean(0), "o-", label=f"mean of {len(results)} seeds")
        ax.fill_between(steps, values.min(0).values, values.max(0).values, alpha=0.25, label="min-max")
        ax.set(xlabel="DPO step", ylabel=label, title=label)
        ax.legend()
    axes[0].axhline(0.5, color="grey", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long pass on a few modules, one seed")
    args = parser.parse_args()
    seeds = [0] if args.quick else [0, 1, 2]
    with tempfile.TemporaryDirectory() as tmp:
        results = [one_seed(seed, args.quick, Path(tmp) / str(seed)) for seed in seeds]
    cells = {key: band([r["final"][key] for r in results]) for key in results[0]["final"]}
    start = {key: band([r[f"{key}_curve"][0][1] for r in results]) for key in ("accuracy", "margin")}
    columns = ["quantity", "start of DPO", "end of DPO"]
    rows = [["held-out reward accuracy", start["accuracy"], cells["reward_accuracy"]],
            ["held-out reward margin", start["margin"], cells["reward_margin"]],
            ["held-out chosen answer log p (SFT model, then after DPO)", cells["chosen_logp_sft"], cells["chosen_logp_dpo"]]]
    print_table(columns, [[q, a["median"], b["median"]] for q, a, b in rows])
    acc, logp = cells["reward_accuracy"], (cells["chosen_logp_dpo"]["median"] - cells["chosen_logp_sft"]["median"])
    reading = (f"Over {len(seeds)} seeds, held-out reward accuracy went from {start['accuracy']['median']:.2f} to "
               f"{acc['median']:.2f} (min {acc['min']:.2f}, max {acc['max']:.2f}) on {cells['pairs']['median']:.0f} "
               f"held-out pairs, the margin to {cells['reward_margin']['median']:.3f}; the chosen answers' "
               f"log-probability under the model {'rose' if logp > 0 else 'fell'} by {abs(logp):.2f} nats on average "
               f"from the SFT model to the DPO model ({cells['chosen_logp_sft']['median']:.2f} -> "
               f"{cells['chosen_logp_dpo']['median']:.2f}).")
    name = "reproduce_dpo" + ("_quick" if args.quick else "")
    png = plot_path(name)
    plot(results, png)
    path = save(name, {"quick": args.quick, "seeds": seeds, "results": results,
                       "table": table(f"dense-tiny -> sft-tiny (LoRA) -> dpo-tiny (LoRA), {len(seeds)} seeds, "
                                      "mean (min-max)", columns, rows),
                       "reading": reading, "plots": [png.name]})
    print(reading)
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
