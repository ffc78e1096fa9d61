"""Import hooks that let SGLang 0.5.23 import on a CPU-only torch build.

Runs at interpreter start (from ``sgl_elastic_compat.pth``) and must stay cheap: it imports no
torch and no sglang. It installs two import hooks:

1. ``sgl_kernel`` stand-in. SGLang's CPU path imports a few names from ``sgl_kernel`` at module
   level, but no CPU build of it exists on the package registry; on a CPU without AMX none of them
   is ever called. When no real ``sgl_kernel`` is installed (the finder sits at the *end* of
   ``sys.meta_path``, so a real one always wins), imports get a stand-in package that provides
   exactly the names in ``STAND_IN_NAMES``, each a function that raises ``NotImplementedError``
   naming itself when called. Every other name or submodule raises ImportError as if sgl_kernel
   were absent, so SGLang's own ``try: from sgl_kernel ... except ImportError`` fallbacks still
   take their pure-torch paths.
2. torchvision op schemas. The registry's torchvision 0.28.0 is a CUDA build whose C extension
   cannot load on CPU torch; its Python side then fails on "operator torchvision::nms does not
   exist". Just before ``torchvision`` is first imported on a CPU-only torch build, the schemas of
   ``torchvision::nms`` and ``torchvision::qnms`` are defined so the import succeeds.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

STAND_IN_ROOT = "sgl_kernel"
# module -> names that SGLang 0.5.23 imports unconditionally on the CPU path (none is ever called
# on a CPU without AMX; a call raises NotImplementedError naming the function).
STAND_IN_NAMES: dict[str, frozenset[str]] = {
    "sgl_kernel": frozenset({
        "assign_draft_cache_locs_contiguous_cpu",
        "assign_extend_cache_locs_cpu",
        "assign_req_to_token_pool_cpu",
        "build_tree_kernel_efficient_cpu",
        "copy_all_layer_kv_cache_cpu",
        "fill_accept_out_cache_loc_cpu",
        "fill_bonus_tokens_cpu",
        "verify_tree_greedy_cpu",
    }),
}


def _raise_not_implemented(qualname: str):
    def stand_in(*args, **kwargs):
        raise NotImplementedError(
            f"{qualname} was called, but sgl_kernel is not installed: this is sgl-elastic's CPU "
            "stand-in (sgl_elastic/compat/boot.py). The caller took a kernel path that needs the "
            "real sgl_kernel (a CUDA or AMX build); use a torch-native path (e.g. "
            "--attention-backend torch_native) or install sglang-kernel on a supported machine."
        )

    stand_in.__name__ = qualname.rsplit(".", 1)[-1]
    stand_in.__qualname__ = qualname
    stand_in._sgl_elastic_stand_in = True
    return stand_in


class StandInModule(types.ModuleType):
    """A module whose unknown public attributes are raising functions (see module docstring)."""

    def __getattr__(self, name: str):
        if name not in STAND_IN_NAMES.get(self.__name__, ()):
            raise AttributeError(
                f"module {self.__name__!r} (sgl-elastic CPU stand-in) has no attribute {name!r}"
            )
        fn = _raise_not_implemented(f"{self.__name__}.{name}")
        setattr(self, name, fn)
        return fn


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = StandInModule(spec.name)
        module.__path__ = []  # a package, so ``sgl_kernel.<sub>`` imports work too
        module._sgl_elastic_stand_in = True
        return module

    def exec_module(self, module):
        return None


class _StandInFinder(importlib.abc.MetaPathFinder):
    """Last-resort finder for ``sgl_kernel`` and its submodules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in STAND_IN_NAMES:
            return importlib.machinery.ModuleSpec(fullname, _StandInLoader(), is_package=True)
        return None


_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_torchvision_library = None  # keeps the torch.library.Library registration alive


def define_torchvision_schemas() -> bool:
    """Define the torchvision op schemas on a CPU-only torch build; True if it defined them."""
    global _torchvision_library
    import torch

    if torch.version.cuda is not None or _torchvision_library is not None:
        return False
    try:
        torch.ops.torchvision.nms  # already defined (a working torchvision build loaded)
        return False
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        lib.define(schema)
    _torchvision_library = lib
    return True


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs :func:`define_torchvision_schemas` once, just before torchvision is imported."""

    done = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" and not self.done:
            self.done = True
            try:
                define_torchvision_schemas()
            except Exception as exc:  # never break an import from an import hook
                print(f"[sgl-elastic compat] torchvision schema fix failed: {exc!r}", file=sys.stderr)
        return None  # the normal finders import torchvision itself


def install() -> None:
    if not any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        sys.meta_path.append(_StandInFinder())
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


install()
