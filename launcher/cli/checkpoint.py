"""``gptforge checkpoint inspect|list``: read a checkpoint's manifest without loading it."""

from __future__ import annotations

import time


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes} B"
        num_bytes /= 1024
    return ""


def _layout(lay: dict) -> str:
    vpp = lay.get("virtual_pipeline_model_parallel_size")
    return (f"TP={lay['tensor_model_parallel_size']} PP={lay['pipeline_model_parallel_size']}"
            + (f" VPP={vpp}" if vpp else "") + f" DP={lay['data_parallel_size']}"
            f" ({lay['engine']} engine, distributed optimizer "
            f"{'on' if lay.get('use_distributed_optimizer') else 'off'})")


def _inspect(args) -> int:
    from gptforge.launcher.run.checkpoint.format import summarize

    s = summarize(args.path)
    m = s["model"]
    saved = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(s["saved_at"]))
    rows = [("checkpoint", s["checkpoint"]),
            ("step", f"step {s['step']} ({s['reason']}), consumed {s['consumed_samples']} "
                     f"samples / {s['consumed_tokens']} tokens"),
            ("layout", _layout(s["layout"])),
            ("model", f"{m['num_layers']} layers, hidden {m['hidden_size']}, "
                      f"{m['num_attention_heads']} heads, seq {m['seq_length']}, "
                      f"vocab {m['vocab_size']}"),
            ("parameters", f"{s['num_parameters']:,}"),
            ("files", f"{s['files']}, {_size(s['bytes'])}"),
            ("tokenizer", f"sha256 {s['tokenizer_sha256']}" if s["tokenizer_sha256"] else "-"),
            ("versions", ", ".join(f"{k} {v}" for k, v in s["versions"].items())),
            ("saved", saved)]
    for key, value in rows:
        print(f"{key:<11} {value}")
    return 0


def _list(args) -> int:
    from gptforge.launcher.run.checkpoint.format import listing

    rows = listing(args.directory)
    if not rows:
        print(f"{args.directory}: no checkpoints")
        return 0
    print(f"{'name':<24} {'state':<9} {'step':>8} {'size':>12}")
    for row in rows:
        step = "" if row["step"] is None else str(row["step"])
        mark = "  <- latest" if row["latest"] else ""
        print(f"{row['name']:<24} {row['state']:<9} {step:>8} {_size(row['bytes']):>12}{mark}")
    return 0


def register(verbs) -> None:
    parser = verbs.add_parser("checkpoint", help="inspect or list checkpoints")
    sub = parser.add_subparsers(dest="checkpoint_verb", required=True)
    p = sub.add_parser("inspect", help="step, layout, parameters, sizes of a checkpoint")
    p.add_argument("path", help="a checkpoint save directory (its latest) or a step-N directory")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("list", help="complete and partial checkpoints of a save directory")
    p.add_argument("directory")
    p.set_defaults(func=_list)

