"""Modules that diffusers imports eagerly but that a run of ours rarely uses, loaded on first use instead.

diffusers imports bitsandbytes at import time whenever it is installed (for its quantizers), which costs
1.1-1.3 s of every command's start on one CPU core (timed by importing it alone after torch; no bench
measures it), and more where bitsandbytes then looks for its kernels on the Hugging Face Hub. We load no
bitsandbytes-quantized model, and our own use of it (the 8-bit AdamW's bitsandbytes backend, and the tests
that compare against it) imports it when it runs. So the module object put in sys.modules here runs its code on the first access to an attribute it does
not hold yet, or on the first import of a submodule: `import bitsandbytes` anywhere costs nothing until then,
and everything behaves as with a plain import afterwards. Unlike the standard library's LazyLoader:
- it answers `__file__`, `__name__`, `__spec__` and `__path__` without loading, because torch's custom-op
  registration (inside the import of diffusers) walks every module in sys.modules asking for `__file__`
  (inspect.getmodule), which would load it at once;
- a submodule import loads the package first (`_LoadParentFirst`), and where the package's own code imported
  that submodule, the import returns that same module. Loading the package from its `__path__` instead (as
  this file once did) made the import system run such a submodule a second time: `import
  bitsandbytes.functional` left two copies of it, the package's and the caller's.

torch._dynamo (1.1 s of every start, imported by diffusers for its `allow_in_graph` decorator) was tried
here and left loaded: diffusers also calls torch.compiler.disable at import, and transformers imports a
submodule of it (masking_utils), so deferring it would save nothing.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

DEFERRED = ("bitsandbytes",)


class _Deferred(types.ModuleType):
    """A module whose code has not run yet: the first attribute it lacks runs it (then it is a plain module)."""

    def __getattr__(self, attr):
        load(self)
        return getattr(self, attr)


def load(module: types.ModuleType) -> None:
    """Run a deferred module's code now (nothing where it has run)."""
    if isinstance(module, _Deferred):
        module.__class__ = types.ModuleType  # from here on a plain module, also if its code fails
        module.__spec__.loader.exec_module(module)


class _Existing(importlib.abc.Loader):
    """Hands the import system a module that is already loaded, as the module it asked for."""

    def __init__(self, module: types.ModuleType):
        self.module = module
        self.spec = module.__spec__

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        module.__spec__ = self.spec  # the import system set the stand-in spec; the module keeps its own


class _LoadParentFirst(importlib.abc.MetaPathFinder):
    """First on sys.meta_path: an import of `pkg.sub` while `pkg` is deferred runs `pkg` first. Where that
    imported `pkg.sub` already, the import system would run it again (having looked in sys.modules before the
    package ran, it goes on to load what the finders find), so the module is taken out of sys.modules for a
    moment and handed back whole through `_Existing`."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        parent = sys.modules.get(name.rpartition(".")[0])
        if not isinstance(parent, _Deferred):
            return None
        load(parent)
        module = sys.modules.pop(name, None)
        if module is None:
            return None  # the other finders find it as usual
        return importlib.machinery.ModuleSpec(name, _Existing(module), is_package=hasattr(module, "__path__"))


def defer(name: str) -> bool:
    """Make `import name` lazy for this process; False where it is already imported or not installed."""
    if name in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _Deferred
    if not any(isinstance(finder, _LoadParentFirst) for finder in sys.meta_path):
        sys.meta_path.insert(0, _LoadParentFirst())
    sys.modules[name] = module
    return True


def defer_unused_imports() -> None:
    """Called before diffusers is first imported (models.set_offline, the command line's start)."""
    for name in DEFERRED:
        defer(name)


def peft_without_bitsandbytes() -> None:
    """Keep peft from loading a still-deferred bitsandbytes. Injecting a LoRA (diffusers' load_lora_weights goes
    through peft) imports peft.tuners.lora.bnb, which asks bitsandbytes whether it has 4-bit layers at import:
    that loads it, 1.2-1.3 s on one core (torch._inductor comes with it; `python -X importtime`), for layer
    types that only bitsandbytes-quantized models have, and we load none. peft.tuners.lora.model holds the
    two checks by name, so they are answered there; a peft without them is left as it is. Once bitsandbytes
    is loaded (the 8-bit optimizer's backend), nothing is changed."""
    if "bitsandbytes" not in sys.modules or is_loaded("bitsandbytes"):
        return
    import peft.tuners.lora.model as lora_model

    for check in ("is_bnb_available", "is_bnb_4bit_available"):
        if hasattr(lora_model, check):
            setattr(lora_model, check, _no)


def _no() -> bool:
    return False


def is_loaded(name: str) -> bool:
    """Whether `name`'s code has run (a deferred module that nothing has used yet has not)."""
    module = sys.modules.get(name)
    return module is not None and not isinstance(module, _Deferred)
