"""The architecture's contracts: layers import downward only, no import cycle, the seams (objective,
converter) take a registered implementation from config, nothing mutates a caller's config, checkpoints hold the
model section only, and models that cannot fit are refused before allocation."""

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
from zoo import registry
from zoo.train.objectives import ObjectiveOutput
from zoo.train.run import train

PACKAGE = Path(zoo.__file__).resolve().parent
# Layer of each top-level part of the package, bottom to top: a module may import only its own layer or below.
LAYERS = {"errors": 0, "registry": 0, "schema": 0, "tokenizer": 0, "blocks": 1, "fp8": 1, "adapters": 2, "model": 2,
          "checkpoint": 3, "train": 4, "interop": 4, "factory": 5, "evaluation": 5, "cli": 5, "__init__": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def top_level_imports(path: Path, known: set[str]) -> set[str]:
    """The zoo modules ``path`` imports at module level (``from zoo import x`` counts x when it is a module)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("zoo")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zoo"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
    return found & known


def test_layers_import_downward_only_and_without_cycles():
    known = modules()
    graph = {name: top_level_imports(path, set(known)) for name, path in known.items()}
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in graph.items() for d in deps if layer(d) > layer(m)]
    assert not upward, upward
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if dep != node and state.get(dep) == 1 and not node.startswith(dep + "."):
                raise AssertionError(f"import cycle: {' -> '.join(stack + [dep])}")
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in graph:  # a package importing its own submodules is no cycle; a submodule importing its parent
        if name not in state:  # package's face is, unless the parent is the package being initialised
            visit(name, [name])


# Every zoo module imported inside a function rather than at the top of its module, and why: an upward reach
# of a convenience method, or an import deferred so that a command or ``import zoo`` stays fast. Adding one
# means adding it here with its reason.
DEFERRED_IMPORTS = [
    ("zoo.model.decoder.save_pretrained", "ZooModel.save_pretrained reaches up to the checkpoint layer"),
    ("zoo.model.decoder.push_to_hub", "ZooModel.push_to_hub reaches up to the checkpoint layer"),
    ("zoo.cli.eval_command", "zoo eval --perplexity: the scoring module, not loaded by the other subcommands"),
    ("zoo.cli.eval_command", "zoo eval --tasks: lm-eval (seconds to import), only when asked for"),
    ("zoo.train.command.main", "train.py: Lightning, imported only once a run starts (not for --plan or --print-config)"),
    ("zoo.interop.registration._register", "transformers' Auto classes: the wrapper imports transformers"),
]


def deferred_imports(name: str, tree: ast.Module) -> list[str]:
    """``module.function`` for every zoo import inside a function: ``from zoo... import``, ``import zoo...`` and
    ``importlib.import_module(...)`` (any argument: a name may hold the module's name)."""
    found = []
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        for n in ast.walk(fn):
            zoo_from = isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("zoo"))
            zoo_import = isinstance(n, ast.Import) and any(a.name.startswith("zoo") for a in n.names)
            dynamic = (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "import_module")
            if zoo_from or zoo_import or dynamic:
                found.append(f"{name}.{fn.name}")
    return found


def test_modules_are_small_and_local_imports_listed():
    lengths = {name: path.read_text().count("\n") for name, path in modules().items()}
    assert max(lengths.values()) <= 450, sorted(lengths.items(), key=lambda kv: -kv[1])[:3]
    local = sorted(d for name, path in modules().items() for d in deferred_imports(name, ast.parse(path.read_text())))
    assert local == sorted(name for name, _ in DEFERRED_IMPORTS), local


@dataclass
class HalfLossConfig:
    scale: float = 0.5


def test_a_registered_objective_trains(tmp_path):
    calls = []

    @zoo.register("objective", "scaled_lm", config=HalfLossConfig)
    class ScaledLM:
        def __init__(self, config: HalfLossConfig):
            self.scale = config.scale

        def __call__(self, model, batch):
            calls.append(batch.shape)
            out = model(batch, labels=batch, return_logits=False)
            loss = self.scale * out.lm_loss
            return ObjectiveOutput(loss, out.lm_loss, batch.numel(), batch.numel(), {"scaled": loss.detach()})

    try:
        config = zoo.load_config("dense-tiny", {
            "model.vocab_size": None, "model.d_model": 32, "model.n_layers": 1, "model.max_seq_len": 32,
            "model.mixer": {"n_heads": 4, "n_kv_heads": 2}, "model.ffn": {"d_hidden": 64},
            "train.data": {"corpus": "pydoc-topics", "seq_len": 16}, "train.batch_size": 2, "train.max_steps": 2,
            "train.val_check_interval": 2, "train.val_batches": 1, "train.log_every": 1, "train.sample_tokens": 0,
            "train.precision": "32-true", "train.out_dir": str(tmp_path),
            "train.objective": {"type": "scaled_lm", "scale": 0.25}})
        result = train(config)
    finally:
        registry.unregister("objective", "scaled_lm")
    assert result.steps == 2 and len(calls) >= 2
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/scaled" in header and "train/lm_loss" not in header  # only what the objective reports


@dataclass
class ZeroBiasConfig:
    value: float = 0.0


def test_a_registered_converter_applies_from_config():
    @zoo.register("converter", "constant_head", config=ZeroBiasConfig)
    class ConstantHead:
        def __init__(self, config: ZeroBiasConfig):
            self.value = config.value

        def convert(self, model: nn.Module) -> nn.Module:
            with torch.no_grad():
                model.head.weight.fill_(self.value)
            return model

    try:
        model = zoo.create_model("dense-tiny", n_layers=1, tie_embeddings=False,
                                 converters=[{"type": "constant_head", "value": 0.0}])
        with pytest.raises(zoo.ConfigError, match=r"model.converters\[0\].type: unknown converter 'nope'"):
            zoo.create_model("dense-tiny", converters=[{"type": "nope"}])
    finally:
        registry.unregister("converter", "constant_head")
    logits = model(torch.randint(0, 257, (1, 5))).logits
    assert torch.equal(logits, torch.zeros_like(logits))


def test_nothing_mutates_the_callers_config(tmp_path):
    config = zoo.load_config("mtp-tiny", {"model.n_layers": 1, "model.d_model": 64})
    before = config.to_dict()
    model = zoo.create_model(config)
    zoo.build_model(config)
    model.drop_mtp()
    assert config.to_dict() == before and config.model.mtp is not None and model.config.mtp is None
    model.save_pretrained(tmp_path / "ckpt")
    loaded = zoo.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.to_dict() == model.config.to_dict()


def test_new_checkpoints_hold_the_model_section_only(tmp_path):
    model = zoo.create_model("switch-tiny", n_layers=1)
    model.save_pretrained(tmp_path / "ckpt")
    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert set(written) == {"format_version", "model"} and written["format_version"] == 2
    assert written["model"] == model.config.to_dict()
    written["format_version"] = 99
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(written))
    with pytest.raises(zoo.CheckpointError, match="format_version 99"):
        zoo.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("overrides, key", [
    ({"n_layers": 10 ** 12}, "model.n_layers"),
    ({"d_model": 10 ** 12}, "model.d_model"),
    ({"d_model": 10 ** 6}, "model.d_model"),
    ({"vocab_size": 10 ** 12}, "model.vocab_size"),
])
def test_models_that_cannot_fit_are_refused_before_allocation(overrides, key):
    with pytest.raises(zoo.ConfigError, match=key):
        zoo.create_model("hybrid-tiny", **overrides)
