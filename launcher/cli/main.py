"""The ``gptforge`` console command and its verbs.

Every verb ends the same way on a problem: one ``gptforge: error: ...`` line and a non-zero exit
code (``launcher/errors.py``); ``--debug`` (or ``GPTFORGE_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from gptforge.common.shutdown import collect_nothing_at_exit
from gptforge.parallel.megatron.startup import before_megatron_import

collect_nothing_at_exit()  # first: its atexit handler runs last
before_megatron_import()  # megatron-core's fallback notes off; on CPU its JIT fuser too

CONFIG_USAGE = "[--config FILE ...] [--section.key=value ...]"
# Modules that add verbs: each has register(subparsers).
VERB_MODULES = ("gptforge.launcher.cli.data", "gptforge.launcher.cli.checkpoint",
                "gptforge.launcher.cli.plan", "gptforge.launcher.cli.launch",
                "gptforge.launcher.cli.mlflow", "gptforge.launcher.cli.report",
                "gptforge.launcher.cli.convert", "gptforge.launcher.cli.generate",
                "gptforge.launcher.cli.eval", "gptforge.launcher.cli.serve")


def positive_int(text: str) -> int:
    """argparse type of counts (tokens, iterations, batch sizes): an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nproc(args: argparse.Namespace) -> int | None:
    from gptforge.common.errors import ConfigError

    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise ConfigError("--nproc-per-node", f"must be >= 1, got {args.nproc_per_node}")
    return args.nproc_per_node


def _train(args: argparse.Namespace) -> int:
    from gptforge.launcher.run import entry as train

    cfg = train.load_args(args.rest, prog="gptforge train")
    nproc = _nproc(args)
    if nproc is None:  # this process is the one rank (or one rank of a torchrun/srun launch)
        from gptforge.parallel.context import destroy_parallel, env_rank_info

        rank, world_size, _ = env_rank_info()  # rank 0 takes the run dir (others: no probe)
        train.preflight(cfg, world_size, is_run_dir_owner=rank == 0)
        try:
            return train.exit_code(train.run(cfg))
        finally:
            destroy_parallel()
    from gptforge.launcher.local import launch_local

    train.preflight(cfg, nproc, is_run_dir_owner=True)  # fail before any rank starts
    return launch_local(nproc, args.rest,
                        mlflow_run_dir=cfg.run.dir if cfg.logging.mlflow else None)


def _config(args: argparse.Namespace) -> int:
    import yaml

    from gptforge.launcher.config import layout_notes, load_config, to_dict, validate
    from gptforge.launcher.overrides import parse_train_args

    files, overrides = parse_train_args(args.rest, prog="gptforge config")
    cfg = load_config(files, overrides)
    p = cfg.parallel
    world = _nproc(args) or p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    layout = validate(cfg, world)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    for note in layout_notes(cfg, layout):
        print(f"# {note} (world size {world})")
    return 0


def _config_epilog() -> str:
    from gptforge.launcher.config import Config, type_name
    from gptforge.launcher.help import config_help

    return config_help(Config, type_name)


def _add_config_verb(verbs, name: str, func, help_text: str, nproc_help: str):
    p = verbs.add_parser(name, help=help_text, description=help_text,
                         usage=f"gptforge {name} [--nproc-per-node N] {CONFIG_USAGE}",
                         epilog=_config_epilog(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="*", metavar="FILE",
                   help="YAML files holding config deltas, applied left to right")
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N", help=nproc_help)
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptforge", description="Distributed GPT training.",
                                     allow_abbrev=False)
    parser.add_argument("--debug", action="store_true",
                        help="print full tracebacks (also GPTFORGE_DEBUG=1)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_config_verb(verbs, "train", _train,
                     "train a GPT (in this process, or N local ranks)",
                     "start N local ranks and supervise them (signals are forwarded)")
    _add_config_verb(verbs, "config", _config,
                     "validate and print the resolved configuration",
                     "validate for N ranks (default: TP x PP)")
    for module in VERB_MODULES:
        importlib.import_module(module).register(verbs)
    return parser


def _split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """For train/config: argparse sees --nproc-per-node and -h; the rest is config arguments."""
    known, rest, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token in ("-h", "--help", "--debug"):
            known.append(token)
        elif token == "--nproc-per-node" and i + 1 < len(argv):
            known += argv[i:i + 2]
            i += 1
        elif token.startswith("--nproc-per-node="):
            known.append(token)
        else:
            rest.append(token)
        i += 1
    return known, rest


def main(argv: list[str] | None = None) -> int:
    from gptforge.common.log import DEBUG_ENV
    from gptforge.launcher.errors import report

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    verb_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    rest: list[str] = []
    if verb_at < len(argv) and argv[verb_at] in ("train", "config"):
        known, rest = _split_config_args(argv[verb_at + 1:])
        argv = [*argv[:verb_at + 1], *known]
    args = parser.parse_args(argv)
    args.rest = rest
    args.verb_argv = argv[verb_at:]  # (a verb that starts ranks passes its own arguments on)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("gptforge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 (every failure ends in one line, see errors.py)
        from gptforge.parallel.context import env_rank_info

        rank, world_size, local_rank = env_rank_info()  # a rank of `generate --nproc-per-node`
        return report(exc, rank if "RANK" in os.environ else None, world_size, local_rank)


if __name__ == "__main__":
    sys.exit(main())
