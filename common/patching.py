"""The one way gptforge patches a library it runs on: loudly, in one line, at start.

megatron-core and DeepSpeed need fixes and, on a CPU-only torch, a compatibility layer, all of
them assignments to attributes of those libraries. An upgrade can rename a target (the
assignment would then add an unused attribute and patch nothing) or change a function whose body
a fix copies (the copy would silently undo upstream's change). So every patch names its target
as ``"package.module:Class.attr"`` and, where it re-writes an upstream body, the SHA-256 of
the upstream source it was written against; ``Patches.install`` checks both before it assigns
anything, and fails with one line that names the target and the installed version::

    megatron-core 0.20.0 (tested: 0.16.1): fix 'b' cannot be installed:
    megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._set_main... has changed since
    the fix copied its body (source sha256 1f2e... , written against 9a8b...)

``install`` runs at every engine build and is cheap after the first: a target that already
holds its replacement is only looked at. ``check`` verifies every target without installing
(the unit test that every patch target exists).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

from gptforge.common.errors import UserError

MISSING = object()
# The versions the test suite runs on: what every patch was written against, and what an engine
# build insists on (``parallel/versions.py``) unless told otherwise.
TESTED = {"megatron-core": "0.16.1", "deepspeed": "0.19.8", "torch": "2.13.0"}


class PatchError(UserError):
    """A library no longer offers what a patch of ours needs; one line, naming the target."""


def installed_version(dist: str) -> str:
    """The installed version of distribution ``dist`` (its metadata), or "not installed"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def source_sha256(fn: Callable) -> str:
    """The first 16 hex digits of the SHA-256 of ``fn``'s (dedented) source."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    text = textwrap.dedent(inspect.getsource(fn))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Patch:
    name: str  # how the owner calls it: "a", "writer", "cuda device"
    target: str  # "package.module:Attr.path"
    replacement: Any = MISSING  # MISSING: a target that is only read or swapped briefly
    copied_sha256: str | None = None  # the upstream source a re-written body was copied from
    inherited: bool = False  # a class attribute may come from a base class (else: its own)
    original: Any = MISSING  # what the target held before install


class Patches:
    """The patches one owner (megatron fixes, the CPU layer...) applies to library ``dist``."""

    def __init__(self, owner: str, dist: str, tested: str):
        self.owner, self.dist, self.tested = owner, dist, tested
        self.patches: dict[str, Patch] = {}

    def add(self, name: str, target: str, replacement: Any = MISSING, *,
            copied_sha256: str | None = None, inherited: bool = False) -> Patch:
        self.patches[name] = Patch(name, target, replacement, copied_sha256, inherited)
        return self.patches[name]

    def fail(self, patch: Patch, why: str) -> PatchError:
        return PatchError(f"{self.dist} {installed_version(self.dist)} (tested: {self.tested}): "
                          f"{self.owner} {patch.name!r} cannot be installed: {patch.target} "
                          f"{why}")

    def _owner_of(self, patch: Patch) -> tuple[Any, str]:
        module_name, _, attr_path = patch.target.partition(":")
        try:
            obj = importlib.import_module(module_name)
        except ImportError as err:
            raise self.fail(patch, f"cannot be imported ({err})") from None
        *parents, attr = attr_path.split(".")
        for part in parents:
            obj = inspect.getattr_static(obj, part, MISSING)
            if obj is MISSING:
                raise self.fail(patch, "does not exist in this version")
        return obj, attr

    def _verified(self, patch: Patch) -> tuple[Any, str, Any]:
        """(owner, attribute, the upstream value) after the existence and source checks."""
        owner, attr = self._owner_of(patch)
        if isinstance(owner, type) and not patch.inherited:  # the class's own, not a base's
            current = vars(owner).get(attr, MISSING)  # (a staticmethod as it is)
        else:
            current = inspect.getattr_static(owner, attr, MISSING)
        installed = patch.replacement is not MISSING and current is patch.replacement
        upstream = patch.original if installed else current
        if upstream is MISSING:
            raise self.fail(patch, "does not exist in this version")
        if patch.copied_sha256 is not None:
            found = source_sha256(upstream)
            if found != patch.copied_sha256:
                raise self.fail(patch, f"has changed since the patch copied its body (source "
                                       f"sha256 {found}, written against {patch.copied_sha256})")
        return owner, attr, upstream

    def check(self) -> None:
        """Every target exists and every copied body is unchanged; installs nothing."""
        for patch in self.patches.values():
            self._verified(patch)

    def install(self) -> None:
        """Check, then assign every replacement not in place yet (idempotent)."""
        todo = []
        for patch in self.patches.values():
            owner, attr, upstream = self._verified(patch)
            if patch.replacement is not MISSING and \
                    inspect.getattr_static(owner, attr) is not patch.replacement:
                todo.append((patch, owner, attr, upstream))
        for patch, owner, attr, upstream in todo:  # all checked before the first assignment
            patch.original = upstream
            setattr(owner, attr, patch.replacement)

    def original(self, name: str) -> Any:
        """The upstream value the patch ``name`` replaced (its target's, before install)."""
        patch = self.patches[name]
        if patch.original is MISSING:
            owner, attr, upstream = self._verified(patch)
            return upstream
        return patch.original
