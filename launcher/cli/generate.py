"""``gptforge generate``: text from our checkpoint (any saved layout, run at TP=1) or a Hugging
Face folder, with megatron-core's KV cache (``model/generate.py``).

    gptforge generate --checkpoint PATH --prompt TEXT [--prompt TEXT ...] [--prompts-file F]
        [--max-new-tokens N] [--greedy | --temperature T --top-k K --top-p P]
        [--repetition-penalty R] [--seed S] [--batch-size B] [--output-json F]

Greedy unless a sampling option is given. ``--max-new-tokens`` defaults to 64, or fewer where the
longest prompt leaves less room in the model's context (with a notice). One prompt streams its
completion as it is made; several are generated in batches and printed in order.
``--output-json`` writes a list with one object per prompt: ``prompt``, ``completion`` and
``token_ids`` (the generated ids only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptforge.common.log import get_logger

log = get_logger(__name__)

DEFAULT_NEW_TOKENS = 64


def read_prompts(args) -> list[str]:
    from gptforge.common.errors import ConfigError

    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError("--prompts-file", f"{path}: cannot read: {err}") from None
        for number, line in enumerate(lines, 1):
            if path.suffix == ".jsonl" and line.strip():
                prompts.append(_jsonl_prompt(path, number, line))
            elif path.suffix != ".jsonl" and line:
                prompts.append(line)
    if not prompts:
        raise ConfigError("--prompt", "no prompt given (--prompt TEXT or --prompts-file F)")
    return prompts


def _jsonl_prompt(path: Path, number: int, line: str) -> str:
    from gptforge.common.errors import ConfigError

    try:
        record = json.loads(line)
    except ValueError as err:
        raise ConfigError("--prompts-file", f"{path}:{number}: not JSON: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ConfigError("--prompts-file", f"{path}:{number}: needs a string \"prompt\" field")
    return record["prompt"]


def sampling_of(args):
    from gptforge.model.generate import Sampling

    sampled = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    if args.greedy or not sampled:
        return Sampling(0.0, 0, 1.0, args.repetition_penalty)
    return Sampling(1.0 if args.temperature is None else args.temperature, args.top_k or 0,
                    1.0 if args.top_p is None else args.top_p, args.repetition_penalty)


class Streamer:
    """Prints one prompt's completion as tokens come (whole characters only)."""

    def __init__(self, tok, stream=None):
        self.tok, self.stream, self.ids, self.shown = tok, stream or sys.stdout, [], 0

    def __call__(self, row: int, token: int) -> None:
        from gptforge.data.tokenizer import settled_text

        self.ids.append(token)
        text = settled_text(self.tok, self.ids)  # (what later tokens cannot change)
        if len(text) > self.shown:
            self.stream.write(text[self.shown:])
            self.stream.flush()
            self.shown = len(text)

    def finish(self) -> None:
        """What is still held back (bytes that never became a character), then a newline."""
        self.stream.write(self.tok.decode(self.ids)[self.shown:] + "\n")
        self.stream.flush()


def _tokenizer(loaded, override: str | None):
    from gptforge.data import tokenizer
    from gptforge.common.errors import ConfigError

    path = override or loaded.tokenizer_path
    if not path:
        raise ConfigError("--tokenizer", f"{loaded.path} names no tokenizer "
                          f"(data.tokenizer_model); pass --tokenizer")
    tok = tokenizer.load(path)
    if tok.get_piece_size() > loaded.cfg.model.vocab_size:
        raise ConfigError("--tokenizer", f"{path}: {tok.get_piece_size()} tokens, more than the "
                          f"model's vocab_size {loaded.cfg.model.vocab_size}")
    return tok


def generate_texts(loaded, tok, prompts: list[str], args) -> list[dict]:
    from gptforge.model.generate import check_prompts

    quiet = args.quiet or not loaded.is_output_rank  # (the other ranks compute the same)
    ids = [tok.encode(p) for p in prompts]
    context = loaded.cfg.model.seq_length
    limit = new_tokens(args.max_new_tokens, ids, prompts, context, quiet=quiet)
    check_prompts(ids, [limit] * len(ids), context, prompts)  # before a prompt is echoed
    runner = loaded.runner
    with runner.decode_layout():  # one set of decoding copies for every batch
        return _generate_texts(loaded, runner, tok, prompts, ids, limit, args, quiet)


def new_tokens(asked: int | None, ids: list[list[int]], prompts: list[str], context: int, *,
               quiet: bool = False) -> int:
    """``--max-new-tokens`` as given (one that does not fit is refused by ``check_prompts``), or
    by default as many of 64 as the longest prompt leaves room for, with a notice when fewer."""
    from gptforge.model.generate import GenerationError, prompt_label

    if asked is not None:
        return asked
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    room, name = context - len(ids[longest]), prompt_label(longest, prompts[longest])
    if room < 1:
        raise GenerationError(f"{name}: its {len(ids[longest])} tokens leave no room for new "
                              f"tokens in the model's context of {context} tokens "
                              f"(model.seq_length); shorten it")
    if room < DEFAULT_NEW_TOKENS and not quiet:
        log.warning(f"generating at most {room} new tokens, not {DEFAULT_NEW_TOKENS}: {name} "
                    f"has {len(ids[longest])} of the model's {context} context tokens "
                    f"(--max-new-tokens N to choose)")
    return min(DEFAULT_NEW_TOKENS, room)


def _generate_texts(loaded, runner, tok, prompts: list[str], ids: list[list[int]], limit: int,
                    args, quiet: bool) -> list[dict]:
    from gptforge.model.generate import generate_batch

    stream = len(prompts) == 1 and not quiet
    results = []
    streamer = Streamer(tok) if stream else None
    for start in range(0, len(prompts), args.batch_size):
        batch = ids[start:start + args.batch_size]
        if stream:
            print(prompts[0], end="", flush=True)
        out = generate_batch(runner, batch, max_new_tokens=limit,
                             vocab_size=loaded.cfg.model.vocab_size,
                             context=loaded.cfg.model.seq_length, sampling=sampling_of(args),
                             seed=args.seed, eod_id=tok.eos_id(), kv_cache=not args.no_kv_cache,
                             on_token=streamer)
        for k, generated in enumerate(out):
            prompt = prompts[start + k]
            results.append({"prompt": prompt, "completion": tok.decode(generated),
                            "token_ids": generated})
            if not stream and not quiet:
                print(f"=== prompt {start + k}\n{prompt}{results[-1]['completion']}", flush=True)
    if streamer is not None:
        streamer.finish()
    return results


def _generate(args) -> int:
    from gptforge.launcher.cli.ranks import launch, loaded_model

    prompts = read_prompts(args)
    sampling_of(args).check()
    code = launch(args, args.checkpoint)
    if code is not None:
        return code
    with loaded_model(args, args.checkpoint) as loaded:
        tok = _tokenizer(loaded, args.tokenizer)
        results = generate_texts(loaded, tok, prompts, args)
        output = loaded.is_output_rank
    if args.output_json and output:
        Path(args.output_json).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return 0


def register(verbs) -> None:
    from gptforge.launcher.cli.main import positive_int
    from gptforge.launcher.cli.ranks import add_layout_args

    p = verbs.add_parser("generate", help="generate text from a checkpoint or a Hugging Face "
                         "folder (KV cache)", description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="our checkpoint (save dir or step dir, any layout) or a Hugging Face "
                        "GPT-2/Llama folder")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="F",
                   help="prompts, one per line (.jsonl: a \"prompt\" field per line)")
    p.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                   help=f"tokens to generate per prompt (default: {DEFAULT_NEW_TOKENS}, or what "
                        f"the model's context leaves after the longest prompt)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="the most likely token (default)")
    mode.add_argument("--temperature", type=float, metavar="T", help="sample at temperature T")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="B",
                   help="prompts generated together")
    p.add_argument("--tokenizer", metavar="T", help="tokenizer to use instead of the model's")
    p.add_argument("--output-json", metavar="F", help="write prompts, completions and ids")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute every step (slow)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    add_layout_args(p)
    p.set_defaults(func=_generate)
