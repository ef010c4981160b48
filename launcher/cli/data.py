"""The data verbs of ``gptforge``: ``tokenizer train|encode|decode``, ``data prepare`` and
``data sample-corpus`` (a small text corpus from this machine's Python sources, to try things on).

``register(subparsers)`` adds them to the launcher's argparse subparsers; every leaf parser
sets ``func(args) -> exit code``. A user mistake raises ``DataError`` (one line naming the file
or flag at fault) for the caller to print. ``python -m gptforge.launcher.cli.data ...`` runs them
standalone and prints such an error as ``gptforge: error: <message>`` (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from gptforge.data.text_inputs import TXT_UNITS

SAMPLE_SIZE_NAMES = ("small", "medium")  # gptforge.data.synthetic.SAMPLE_SIZES

TOKENIZER_HELP = "sentencepiece .model file, or Hugging Face tokenizer folder or tokenizer.json"


def _add_text_input_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True,
                        help=".txt/.jsonl/.jsonl.gz files, directories or globs")
    parser.add_argument("--text-key", default="text", help="jsonl field holding the text")
    parser.add_argument("--txt-unit", choices=TXT_UNITS, default="paragraph",
                        help="what one .txt document is (default: blank-line separated paragraph)")


def _tokenizer_train(args) -> int:
    from gptforge.data import tokenizer
    symbols = tuple(s for group in args.user_defined_symbols for s in group.split(",") if s)
    result = tokenizer.train(args.input, args.model_prefix, args.vocab_size,
                             model_type=args.model_type, user_defined_symbols=symbols,
                             input_sentence_size=args.input_sentence_size,
                             text_key=args.text_key, txt_unit=args.txt_unit,
                             byte_fallback=not args.no_byte_fallback,
                             num_threads=args.num_threads)
    print(json.dumps(result.__dict__, indent=2))
    return 0


def _tokenizer_encode(args) -> int:
    from gptforge.data import tokenizer
    proc = tokenizer.load(args.model)
    texts = [args.text] if args.text is not None else [sys.stdin.read()]
    for text in texts:
        print(" ".join(map(str, tokenizer.encode(proc, text))))
    return 0


def _tokenizer_decode(args) -> int:
    from gptforge.data import tokenizer
    proc = tokenizer.load(args.model)
    ids = args.ids if args.ids else sys.stdin.read().split()
    sys.stdout.write(tokenizer.decode(proc, [int(i) for i in ids]))
    sys.stdout.write("\n" if os.isatty(1) else "")
    return 0


def _data_prepare(args) -> int:
    from gptforge.data.prepare import PrepareSettings, prepare
    settings = PrepareSettings(
        inputs=args.input, tokenizer=args.tokenizer, out=args.out, text_key=args.text_key,
        txt_unit=args.txt_unit, valid_fraction=args.valid_fraction,
        shard_size_mb=args.shard_size_mb, workers=args.workers, format=args.format,
        command=["gptforge", *sys.argv[1:]] if args.command is None else shlex.split(args.command))
    index = prepare(settings, progress=not args.no_progress)
    for split, info in index["splits"].items():
        print(f"{split}: {len(info['shards'])} shards, {info['docs']} documents, "
              f"{info['tokens']} tokens")
    if not index["splits"]["valid"]["docs"] and not args.valid_fraction:
        print("note: no valid split (--valid-fraction 0): a training that validates "
              "(train.eval_interval > 0) needs one; rerun with --valid-fraction 0.05, or train "
              "with --train.eval_interval=0")
    return 0


def _data_sample_corpus(args) -> int:
    from gptforge.data.synthetic import SAMPLE_SIZES, text_corpus_files
    files = text_corpus_files(args.out_dir, SAMPLE_SIZES[args.size])
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} files, {size} bytes: {args.out_dir}")
    return 0


def _register_tokenizer(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a sentencepiece tokenizer, or use one "
                                   "or a Hugging Face tokenizer")
    verbs = parser.add_subparsers(dest="tokenizer_verb", required=True)
    train = verbs.add_parser("train", help="train <prefix>.model from text")
    _add_text_input_args(train)
    train.add_argument("--model-prefix", required=True, help="writes <prefix>.model/.vocab/.json")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--user-defined-symbols", action="append", default=[],
                       help="comma-separated special tokens (repeatable)")
    train.add_argument("--input-sentence-size", type=int, default=2_000_000,
                       help="sample at most this many sentences (lines) from large inputs")
    train.add_argument("--no-byte-fallback", action="store_true")
    train.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    train.set_defaults(func=_tokenizer_train)
    encode = verbs.add_parser("encode", help="text (--text or stdin) -> token ids")
    encode.add_argument("--model", required=True, help=TOKENIZER_HELP)
    encode.add_argument("--text", default=None)
    encode.set_defaults(func=_tokenizer_encode)
    decode = verbs.add_parser("decode", help="token ids (arguments or stdin) -> text")
    decode.add_argument("--model", required=True, help=TOKENIZER_HELP)
    decode.add_argument("ids", nargs="*")
    decode.set_defaults(func=_tokenizer_decode)


def _register_data(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare tokenized WebDataset shards; write a "
                                   "sample text corpus")
    verbs = parser.add_subparsers(dest="data_verb", required=True)
    prep = verbs.add_parser("prepare", help="text -> <out>/<split>-%%06d.tar + index.json")
    _add_text_input_args(prep)
    prep.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    prep.add_argument("--format", choices=("pretrain", "sft"), default="pretrain",
                      help="sft: .jsonl lines with 'prompt' and 'response' strings; the prompt "
                           "tokens carry no loss (train with data.format=sft)")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--valid-fraction", type=float, default=0.0)
    prep.add_argument("--shard-size-mb", type=float, default=256.0)
    prep.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    prep.add_argument("--no-progress", action="store_true")
    prep.add_argument("--command", default=None, help=argparse.SUPPRESS)
    prep.set_defaults(func=_data_prepare)
    sample = verbs.add_parser(
        "sample-corpus", help="write a small text corpus (this machine's Python stdlib sources "
        "as .txt files) to try the tokenizer and data verbs on",
        description="Copy Python standard-library sources into OUT_DIR as .txt files: a corpus "
                    "present on every machine. Only those files are written (an existing "
                    "OUT_DIR keeps its other files).")
    sample.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the .txt files in")
    sample.add_argument("--size", choices=tuple(SAMPLE_SIZE_NAMES), default="small",
                        help="small (default): json, email, textwrap, string, this (about "
                             "0.4 MB); medium: also logging, asyncio, http, unittest, argparse "
                             "(about 1.7 MB, the demo's)")
    sample.set_defaults(func=_data_sample_corpus)


def register(subparsers) -> None:
    """Add ``tokenizer`` and ``data`` to an argparse subparsers object."""
    _register_tokenizer(subparsers)
    _register_data(subparsers)
