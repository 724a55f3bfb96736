"""Plugins: one folder per study, one file per run (plugins/<study>/run_<n>_<slug>.py).

A run file defines only what its run changes. Whatever of `SAE`, `Trainer` and `Hyperparams` it
leaves out is taken, as it finishes importing, from the run it imports as `parent` (or from the
harness's base classes in experiment.py), so `class SAE(parent.SAE)` works whatever the parent
defined itself.
"""

import importlib.abc
import importlib.machinery
import re
import sys

INHERITED = ("SAE", "Trainer", "Hyperparams")


class _RunLoader(importlib.machinery.SourceFileLoader):
    def exec_module(self, module):
        super().exec_module(module)
        parent = getattr(module, "parent", None)
        if not getattr(parent, "__name__", "").startswith(__name__ + "."):
            import experiment as parent  # a first run builds on the harness's classes
        for name in INHERITED:
            if name not in vars(module):
                setattr(module, name, getattr(parent, name))


class _RunFinder(importlib.abc.MetaPathFinder):
    """Loads plugins.<study>.run_<n>_<slug> modules with _RunLoader."""

    def find_spec(self, name, path, target=None):
        if not re.fullmatch(rf"{__name__}\.\w+\.run_\d+\w*", name):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            spec.loader = _RunLoader(spec.loader.name, spec.loader.path)
        return spec


if not any(isinstance(finder, _RunFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RunFinder())
