"""Registering zoo's model type with transformers' Auto classes without importing transformers at ``import zoo``.

Importing transformers' model classes takes several seconds, more than ``import zoo`` itself, so
``import zoo`` only calls :func:`register_when_transformers_is_imported`: if transformers is already
imported, :mod:`zoo.interop.hf` (which registers) is imported now; otherwise a finder on ``sys.meta_path``
waits for the first ``import transformers`` and imports :mod:`zoo.interop.hf` right after transformers'
own ``__init__`` has run, then removes itself. Either way, after ``import zoo``,
``transformers.AutoModelForCausalLM.from_pretrained`` loads ``model_type: zoo`` checkpoints, and a session
that never imports transformers pays nothing. (The hook is the standard import-system extension point,
PEP 451 finders and loaders; importing :mod:`zoo.interop.hf` directly registers too.)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_TRANSFORMERS = "transformers"
_WRAPPER = "zoo.interop.hf"


def register_when_transformers_is_imported() -> None:
    """Register zoo's model type with transformers now if it is imported, else as soon as it is."""
    if _TRANSFORMERS in sys.modules:
        _register()
    elif not any(isinstance(finder, _TransformersFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TransformersFinder())


def _register() -> None:
    try:
        importlib.import_module(_WRAPPER)
    except Exception as err:  # an incompatible transformers must not break `import transformers`
        warnings.warn(f"zoo could not register its model type with transformers ({type(err).__name__}: {err}); "
                      f"AutoModelForCausalLM will not load model_type 'zoo' checkpoints", stacklevel=2)


class _TransformersFinder(importlib.abc.MetaPathFinder):
    """Finds ``transformers`` through the other finders and wraps its loader to register afterwards (once)."""

    def find_spec(self, name, path, target=None):
        if name != _TRANSFORMERS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """transformers' own loader, which registers zoo once the package has executed."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_resource_reader, get_source, ...: transformers' loader answers
        return getattr(self._loader, name)
