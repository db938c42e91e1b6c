"""The ``zoo`` command: ``zoo list``, ``zoo info MODEL``, ``zoo generate MODEL PROMPT``, ``zoo chat MODEL``,
``zoo eval MODEL``, ``zoo import SRC OUT_DIR``, ``zoo export MODEL OUT_DIR``, ``zoo push RUN_DIR REPO``,
``zoo train ...`` (``zoo COMMAND --help`` for each).

MODEL is a preset name (``zoo list``; its Hub weights where it has some), a checkpoint or adapter directory, a
training run's directory (its ``final/`` export), or ``hf-hub:org/repo``. A command is a function ``(args) -> exit
status`` whose docstring is its help, registered with its arguments by :func:`add_command`. Exit status: 0
done, 1 a failure (a checkpoint that cannot be read, a failed download), 2 a usage error (a bad model name,
a bad option).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from zoo.checkpoint.adapters import is_adapter_dir
from zoo.checkpoint.files import read_json
from zoo.checkpoint.hub import HUB_PREFIX, upload_checkpoint
from zoo.checkpoint.pretrained import from_pretrained, read_model_config
from zoo.errors import CheckpointError, ConfigError
from zoo.factory import create_model, list_models
from zoo.interop.export import FAMILIES, FORMATS, export
from zoo.model import ModelConfig, build_skeleton
from zoo.model.memory import format_bytes
from zoo.train.command import main as train_main
from zoo.train.config import load_config
from zoo.train.corpus import EMBEDDED_CORPORA, get_corpus, split_documents

COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], list[tuple[tuple, dict]]]] = {}


class UsageError(Exception):
    """A command line that names something that does not exist (exit status 2)."""


def arg(*flags: str, **options) -> tuple[tuple, dict]:
    """One ``argparse`` argument of a command: ``add_argument(*flags, **options)``."""
    return flags, options


def add_command(name: str, run: Callable[[argparse.Namespace], int], *arguments: tuple[tuple, dict]) -> None:
    """Register ``zoo NAME``: ``run(args)`` returns the exit status; its docstring is the command's help."""
    COMMANDS[name] = (run, list(arguments))


# --------------------------------------------------------------------------- models by name


def checkpoint_dir(spec: str) -> Path | None:
    """The checkpoint directory ``spec`` names: itself (it has a ``config.json``, or is an adapter directory)
    or a run's ``final/``."""
    path = Path(spec).expanduser()
    for candidate in (path, path / "final"):
        if (candidate / "config.json").is_file() or is_adapter_dir(candidate):
            return candidate
    return None


def load_model(spec: str, dtype: torch.dtype | None = None):
    """The model MODEL names, with weights: a checkpoint or run directory, ``hf-hub:org/repo``, or a preset
    with Hub weights (``hub.repo_id``)."""
    directory = checkpoint_dir(spec)
    if directory is not None:
        return from_pretrained(directory, dtype=dtype)
    if spec.startswith(HUB_PREFIX):
        model = create_model(spec)
    else:
        config = load_config(_preset(spec))
        if config.hub.repo_id is None:
            raise UsageError(f"preset {spec!r} has no trained weights (no hub.repo_id): train it with "
                             f"`zoo train --config {spec}` and pass the run directory")
        model = create_model(spec, pretrained=True)
    return model if dtype is None else model.to(dtype)


def model_config(spec: str) -> ModelConfig:
    """The model config MODEL names, without loading weights where the config alone says it."""
    directory = checkpoint_dir(spec)
    if directory is not None:
        if is_adapter_dir(directory):
            return from_pretrained(directory).config
        raw = read_json(directory / "config.json")
        return from_pretrained(directory).config if "model_type" in raw else read_model_config(raw, directory)
    if spec.startswith(HUB_PREFIX):
        return create_model(spec).config
    return load_config(_preset(spec)).model


def _preset(spec: str) -> str:
    presets = list_models()
    if spec in presets or Path(spec).suffix in (".yaml", ".yml") and Path(spec).is_file():
        return spec
    close = difflib.get_close_matches(spec, presets, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; presets: {', '.join(presets)}"
    raise UsageError(f"unknown model {spec!r}: not a preset, a checkpoint or run directory, or hf-hub:org/repo{hint}")


# --------------------------------------------------------------------------- commands


def list_command(args) -> int:
    """List the preset names (optionally matching a glob pattern)."""
    for name in list_models(args.pattern):
        print(name)
    return 0


def info_command(args) -> int:
    """Show a model's blocks per layer, total and active parameters, and weight memory."""
    config = model_config(args.model)
    with torch.device("meta"):
        skeleton = build_skeleton(config)
    total, active = skeleton.num_parameters(), skeleton.num_parameters(active=True)
    print(f"model: {args.model}")
    print(f"d_model {config.d_model}, {config.n_layers} layers, vocab {config.vocab_size}, "
          f"max_seq_len {config.max_seq_len}, tie_embeddings {config.tie_embeddings}")
    for layers, (mixer, ffn) in _layer_groups(config):
        print(f"  layers {layers}: mixer {_spec(mixer)} | ffn {_spec(ffn)}")
    if config.mtp is not None:
        print(f"  mtp: depth {config.mtp.depth}")
    print(f"parameters: {total:,} total, {active:,} active per token")
    print(f"memory (weights): {format_bytes(total * 4)} float32, {format_bytes(total * 2)} bfloat16")
    return 0


def generate_command(args) -> int:
    """Continue a prompt with a model, streaming the text as it is generated."""
    model = load_model(args.model)
    if model.tokenizer is None:
        raise UsageError(f"{args.model!r} has no tokenizer (no tokenizer.json beside its weights)")
    generator = torch.Generator(model.embed.weight.device).manual_seed(args.seed)
    pieces = model.generate_text(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                 args.stop, args.repetition_penalty, stream=True, generator=generator)
    print(args.prompt, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    return 0


def chat_command(args) -> int:
    """Chat with a model that has a chat template: each line read is a user turn, the reply is streamed. /reset
    starts a new conversation; an end of input (Ctrl-D) ends. The oldest exchanges are dropped when the
    conversation outgrows the model's context."""
    model = load_model(args.model).eval()
    tokenizer = model.tokenizer
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise UsageError(f"{args.model!r} has no chat template (tokenizer_config.json with chat_template beside "
                         "tokenizer.json): fine-tune it with the sft objective first, or use zoo generate")
    generator = torch.Generator(model.embed.weight.device).manual_seed(args.seed)
    stop = [tokenizer.end_of_turn_id] if getattr(tokenizer, "end_of_turn_id", None) is not None else []
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = list(start)
            print("(new conversation)", flush=True)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        context = model.config.max_seq_len
        messages, prompt = _fitting_prompt(tokenizer, messages, context - min(args.max_new_tokens, context // 2))
        if prompt is None:
            print(f"zoo chat: the message does not fit the model's context of {context} tokens with room for a "
                  "reply; shorten it", file=sys.stderr)
            continue
        new_tokens = min(args.max_new_tokens, context - len(tokenizer.encode(prompt)))
        reply = ""
        for piece in model.generate_text(prompt, new_tokens, args.temperature, args.top_k, args.top_p, stop,
                                         stream=True, generator=generator):
            print(piece, end="", flush=True)
            reply += piece
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})


def _fitting_prompt(tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], str | None]:
    """``(messages, prompt)``: the chat template's generation prompt for ``messages``, the oldest exchanges
    (after a system message) dropped until it is at most ``budget`` tokens; ``(without the last, None)``
    when even the last message alone does not fit."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    while rest:
        prompt = tokenizer.apply_chat_template(system + rest, add_generation_prompt=True, tokenize=False)
        if len(tokenizer.encode(prompt)) <= budget:
            return system + rest, prompt
        rest = rest[2:] if len(rest) > 1 else []
    return messages[:-1], None


def eval_command(args) -> int:
    """Evaluate a model: lm-evaluation-harness tasks (--tasks) and/or perplexity (--perplexity)."""
    if not args.tasks and not args.perplexity:
        raise UsageError("zoo eval needs --tasks and/or --perplexity")
    model = load_model(args.model)
    if model.tokenizer is None:
        raise UsageError(f"{args.model!r} has no tokenizer (no tokenizer.json beside its weights)")
    report = {}
    if args.perplexity:
        scoring = importlib.import_module("zoo.evaluation.scoring")
        documents = _documents(args.perplexity, args.limit)
        report["perplexity"] = scoring.perplexity(model, model.tokenizer, documents, args.batch_size).to_dict()
        print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in report["perplexity"].items()))
    if args.tasks:
        harness = importlib.import_module("zoo.evaluation.harness")  # lm-eval, imported only here
        results = harness.evaluate(model, args.tasks.split(","), include_path=args.include_path,
                                   batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot,
                                   bootstrap_iters=args.bootstrap_iters)
        report["tasks"] = results["results"]
        for task, metrics in results["results"].items():
            print(task + ": " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2, default=str))
    return 0


def import_command(args) -> int:
    """Convert a transformers checkpoint (directory or Hub repo) into a zoo checkpoint directory."""
    model = from_pretrained(args.source, revision=args.revision)
    model.save_pretrained(args.out_dir)
    print(f"wrote {args.out_dir}: {model.num_parameters():,} parameters"
          f"{', with tokenizer' if model.tokenizer is not None else ''}")
    return 0


def export_command(args) -> int:
    """Write a model as a transformers checkpoint: the transformers family that represents it (chosen
    automatically, or --family), or zoo's own transformers form (--format zoo; --format auto: a family when one
    fits, else zoo's form). Prints the model_type written."""
    if args.family is not None and args.format == "zoo":
        raise UsageError(f"--family {args.family} is a transformers family: use --format transformers")
    family = export(load_model(args.model), args.out_dir, format=args.format, family=args.family)
    print(f"wrote {args.out_dir}: transformers model_type {family!r}")
    return 0


def push_command(args) -> int:
    """Upload a run's final export (or a checkpoint directory) to a Hugging Face Hub repo."""
    directory = checkpoint_dir(args.run_dir)
    if directory is None:
        raise UsageError(f"{args.run_dir!r} is neither a checkpoint directory (config.json), an adapter directory "
                         "(adapter_config.json), nor a run directory with a final/ export")
    info = upload_checkpoint(directory, args.repo, private=args.private or None, revision=args.revision)
    print(f"pushed {directory} to {args.repo}: {getattr(info, 'commit_url', info)}")
    return 0


def train_command(args) -> int:
    """Train a model: the same as python train.py --config PRESET_OR_YAML [key=value ...]."""
    return train_main(args.train_args, prog="zoo train")


MODEL = arg("model", metavar="MODEL", help="preset name, checkpoint or run directory, or hf-hub:org/repo")
add_command("list", list_command, arg("pattern", nargs="?", default="*", help="glob over preset names"))
add_command("info", info_command, MODEL)
add_command("generate", generate_command, MODEL, arg("prompt"),
            arg("--max-new-tokens", type=int, default=64), arg("--temperature", type=float, default=0.0),
            arg("--top-k", type=int), arg("--top-p", type=float), arg("--repetition-penalty", type=float),
            arg("--stop", action="append", default=[], help="stop string (repeatable)"),
            arg("--seed", type=int, default=0))
add_command("chat", chat_command, MODEL, arg("--system", help="a system message opening each conversation"),
            arg("--max-new-tokens", type=int, default=128), arg("--temperature", type=float, default=0.0),
            arg("--top-k", type=int), arg("--top-p", type=float), arg("--seed", type=int, default=0))
add_command("eval", eval_command, MODEL,
            arg("--tasks", help="comma-separated lm-eval task names"),
            arg("--include-path", help="folder of extra lm-eval task YAML files (then only it is indexed)"),
            arg("--perplexity", metavar="FILE_OR_CORPUS",
                help=f"a text file, folder or embedded corpus ({', '.join(EMBEDDED_CORPORA)}: its validation split)"),
            arg("--limit", type=int, help="at most this many examples per task / documents"),
            arg("--num-fewshot", type=int), arg("--batch-size", type=int, default=8),
            arg("--bootstrap-iters", type=int, default=1000), arg("--output", help="write the results as JSON"))
add_command("import", import_command, arg("source", metavar="HF_DIR_OR_HUB"), arg("out_dir", metavar="OUT_DIR"),
            arg("--revision"))
add_command("export", export_command, MODEL, arg("out_dir", metavar="OUT_DIR"),
            arg("--format", choices=FORMATS, default="transformers"), arg("--family", choices=list(FAMILIES)))
add_command("push", push_command, arg("run_dir", metavar="RUN_DIR"), arg("repo", metavar="REPO"),
            arg("--private", action="store_true"), arg("--revision"))
add_command("train", train_command, arg("train_args", nargs=argparse.REMAINDER, metavar="--config PRESET ...",
                                        help="train.py's arguments (zoo train --help)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (run, arguments) in COMMANDS.items():
        sub = commands.add_parser(name, help=run.__doc__.split("\n")[0], description=run.__doc__)
        for flags, options in arguments:
            sub.add_argument(*flags, **options)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``zoo`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # all of it is train.py's, --help included (argparse's REMAINDER would take it)
        return train_main(argv[1:], prog="zoo train")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, ConfigError) as err:
        print(f"zoo {args.command}: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"zoo {args.command}: {err}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------- helpers


def _documents(spec: str, limit: int | None) -> list[str]:
    corpus = get_corpus(spec)
    documents = corpus.load()
    if spec in EMBEDDED_CORPORA:  # the validation split training holds out (train.data defaults)
        defaults = load_config({}).train.data
        _, val = split_documents(len(documents), defaults.val_fraction, defaults.split_seed)
        documents = [documents[i] for i in val]
    return documents[:limit] if limit else documents


def _layer_groups(config: ModelConfig) -> list[tuple[str, tuple]]:
    """Runs of consecutive layers with the same (mixer, ffn): ``("0-3", (mixer, ffn))``."""
    groups: list[list] = []
    for i in range(config.n_layers):
        blocks = config.layer_blocks(i)
        if groups and groups[-1][1] == blocks:
            groups[-1][0].append(i)
        else:
            groups.append([[i], blocks])
    return [(f"{g[0][0]}" if len(g[0]) == 1 else f"{g[0][0]}-{g[0][-1]}", g[1]) for g in groups]


def _spec(spec) -> str:
    """``type(options that differ from the block's defaults)``."""
    if not dataclasses.is_dataclass(spec.options):
        return spec.type
    defaults = type(spec.options)()
    changed = {f.name: getattr(spec.options, f.name) for f in dataclasses.fields(spec.options)
               if getattr(spec.options, f.name) != getattr(defaults, f.name)}
    options = ", ".join(f"{k}={v}" for k, v in changed.items())
    return f"{spec.type}({options})"


if __name__ == "__main__":
    sys.exit(main())
