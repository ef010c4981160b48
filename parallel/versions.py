"""The library versions gptforge is tested with, checked when an engine is built.

Before any rank builds a model, ``check_versions`` compares the installed megatron-core (and
DeepSpeed, for the deepspeed engine) with the versions the test suite ran on. An untested version
is refused in one line naming both versions; ``parallel.allow_untested_versions=true`` runs it
anyway, and says so. (What an untested version breaks first are the upstream patches: those are
checked target by target when they install, ``common/patching.py``.)
"""

from __future__ import annotations

from gptforge.common.errors import UserError
from gptforge.common.log import get_logger
from gptforge.common.patching import TESTED, installed_version

ENGINE_LIBRARIES = {"megatron": ("megatron-core",), "deepspeed": ("megatron-core", "deepspeed")}
OPT_IN = "parallel.allow_untested_versions"

log = get_logger(__name__)


class UntestedVersion(UserError):
    """An installed library version the test suite has not run on."""


def untested(engine: str) -> list[tuple[str, str, str]]:
    """(distribution, installed, tested) for each library of ``engine`` off its tested version."""
    out = []
    for dist in ENGINE_LIBRARIES[engine]:
        have = installed_version(dist)
        if have != TESTED[dist]:
            out.append((dist, have, TESTED[dist]))
    return out


def check_versions(engine: str, allow_untested: bool) -> None:
    """Refuse (or, opted in, warn about) untested library versions of ``engine``."""
    found = untested(engine)
    if not found:
        return
    what = ", ".join(f"{dist} {have} is installed (tested: {tested})"
                     for dist, have, tested in found)
    if not allow_untested:
        raise UntestedVersion(f"{what}; install the tested version, or set --{OPT_IN}=true to "
                              f"run on it anyway")
    log.warning(f"{what}; running anyway ({OPT_IN}=true)")
