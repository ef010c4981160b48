"""The ``gptforge`` console command and its verbs."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import warnings

# megatron-core warns at import about optional fused kernels (Apex/TE) it falls back from.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(args: argparse.Namespace) -> int:
    from gptforge.launcher import train
    from gptforge.launcher.config import load_config, validate

    files, overrides = train.parse_args(args.rest)
    cfg = load_config(files, overrides)
    if args.nproc_per_node is None:
        from gptforge.parallel.context import destroy_parallel

        try:
            train.run(cfg)
        finally:
            destroy_parallel()
        return 0
    validate(cfg, args.nproc_per_node)  # fail before any process starts
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}",
           f"--master-port={_free_port()}", "-m", "gptforge.launcher.train", *args.rest]
    return subprocess.call(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"})


def _config(args: argparse.Namespace) -> int:
    import yaml

    from gptforge.launcher import train
    from gptforge.launcher.config import load_config, to_dict

    files, overrides = train.parse_args(args.rest)
    print(yaml.safe_dump(to_dict(load_config(files, overrides)), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptforge", description="Distributed GPT training.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("train", help="train a GPT (this process, or N local ranks)",
                         description="gptforge train --config a.yaml [b.yaml] [--section.key=value ...]")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="start N local ranks (torchrun underneath)")
    p.set_defaults(func=_train)
    p = verbs.add_parser("config", help="print the resolved configuration")
    p.set_defaults(func=_config)
    try:
        from gptforge.data import cli as data_cli
    except ImportError:
        data_cli = None
    if data_cli is not None and hasattr(data_cli, "register"):
        data_cli.register(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.verb in ("train", "config"):
        args.rest = rest
    elif rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    from gptforge.launcher.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"gptforge: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
