"""The inference verbs (generate, eval, serve) on one process or on the ranks of a TP x PP
layout: ``--nproc-per-node N`` with ``--parallel.tensor_model_parallel_size`` and
``--parallel.pipeline_model_parallel_size``, as ``gptforge train`` takes them.

With N > 1 this process starts N ranks of the same verb (the local launcher: signals forwarded,
the first failing rank's one line); each rank loads the checkpoint into the layout (the
resharding load that training uses) and global rank 0 prints and writes the results. A Hugging
Face folder is first written as our checkpoint (it loads at any layout) in a temporary
directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

TP = "parallel.tensor_model_parallel_size"
PP = "parallel.pipeline_model_parallel_size"


def add_layout_args(parser) -> None:
    from gptforge.launcher.cli.main import positive_int

    parser.add_argument("--nproc-per-node", type=positive_int, metavar="N",
                        help="run on N local ranks (N = TP x PP)")
    parser.add_argument(f"--{TP}", dest="tp", type=positive_int, default=1, metavar="T",
                        help="tensor parallel size of the inference layout")
    parser.add_argument(f"--{PP}", dest="pp", type=positive_int, default=1, metavar="P",
                        help="pipeline parallel size of the inference layout")
    parser.add_argument("--quantize", choices=("none", "int8"), default="none",
                        help="int8: weight-only int8 linear layers (torchao; about half the "
                             "weights' memory, the embedding stays fp32)")


def in_launched_rank() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc-per-node":
            skip = True
        elif not token.startswith("--nproc-per-node="):
            out.append(token)
    return out


def launch(args, checkpoint: str) -> int | None:
    """In the process a user started with ``--nproc-per-node N``: run N ranks of this verb and
    return their exit code. None where this process is itself the (or a) rank."""
    from gptforge.common.errors import ConfigError
    from gptforge.launcher.local import launch_local
    from gptforge.launcher.modelio.hf_folder import is_hf_folder

    world = args.tp * args.pp
    if in_launched_rank():
        return None
    if (args.nproc_per_node or 1) != world:
        raise ConfigError("--nproc-per-node", f"{args.nproc_per_node or 1} ranks for a layout "
                          f"of TP={args.tp} x PP={args.pp} = {world}: give --nproc-per-node "
                          f"{world}")
    if world == 1:
        return None
    argv = _without_nproc(args.verb_argv)
    converted = None
    if is_hf_folder(checkpoint):
        from gptforge.launcher.modelio.hf_convert import from_hf

        converted = tempfile.mkdtemp(prefix="gptforge-hf-")
        out = os.path.join(converted, "checkpoint")
        from_hf(checkpoint, out, quiet=True)
        argv = [out if a == checkpoint else a for a in argv]
        argv = [f"--checkpoint={out}" if a == f"--checkpoint={checkpoint}" else a for a in argv]
    try:
        return launch_local(world, argv, module="gptforge.launcher.cli.main")
    finally:
        if converted:
            shutil.rmtree(converted, ignore_errors=True)


@contextmanager
def loaded_model(args, checkpoint: str) -> Iterator:
    """The model at the layout of ``args``, on this rank (or alone), torn down after."""
    from gptforge.launcher.modelio.inference import layout_delta, load_any, one_process, quantize
    from gptforge.parallel.context import destroy_parallel

    delta = layout_delta(args.tp, args.pp)
    mode = getattr(args, "quantize", "none")
    if not in_launched_rank():
        with one_process():
            yield quantize(load_any(checkpoint, delta=delta), mode)
        return
    try:
        yield quantize(load_any(checkpoint, delta=delta), mode)
    finally:
        destroy_parallel()
