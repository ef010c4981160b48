"""``gptforge serve``: an OpenAI-compatible completions server over our checkpoint or a Hugging
Face folder, on one process or at a TP x PP layout (rank 0 serves, the others follow).

    gptforge serve --checkpoint PATH [--host 127.0.0.1] [--port 8000] [--model-name NAME]
        [--max-batch-size 8] [--nproc-per-node N --parallel.tensor_model_parallel_size T ...]

``POST /v1/completions`` (prompt, max_tokens, temperature, top_p, top_k, seed, stop, stream),
``GET /v1/models``, ``GET /health``. Bound to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import signal


def _serve(args) -> int:
    from gptforge.common.log import get_logger
    from gptforge.launcher.cli.generate import _tokenizer
    from gptforge.launcher.cli.ranks import in_launched_rank, launch, loaded_model
    from gptforge.launcher.serving.worker import Worker, follow

    if not in_launched_rank():
        _check_port(args.host, args.port)  # before minutes of loading
    code = launch(args, args.checkpoint)
    if code is not None:
        return code
    log = get_logger("gptforge.launcher.serving")
    with loaded_model(args, args.checkpoint) as loaded:
        if not loaded.is_output_rank:
            for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 decides when the server ends
                signal.signal(sig, signal.SIG_IGN)
            follow(loaded)
            return 0
        tok = _tokenizer(loaded, args.tokenizer)
        worker = Worker(loaded, max_batch_size=args.max_batch_size, eod_id=tok.eos_id())
        name = args.model_name or loaded.path.name
        server, http = _start_http(worker, tok, name, loaded.cfg.model.seq_length, args)
        log.info(f"serving {name!r} at http://{args.host}:{args.port}/v1 (OpenAI completions; "
                 f"Ctrl-C ends it)")
        _stop_on_signals(worker)
        try:
            worker.run()  # (the main thread: see Worker)
        finally:
            server.should_exit = True  # (the answers in flight are sent first)
            http.join(timeout=15)
    return 0


def _check_port(host: str, port: int) -> None:
    import socket

    from gptforge.common.errors import ConfigError

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise ConfigError("--port", f"cannot listen on {host}:{port}: {err.strerror or err}; "
                          f"choose another --port (or --host)") from None


def _start_http(worker, tok, name: str, context: int, args):
    """uvicorn on a thread of its own, once it listens: (server, thread)."""
    import threading
    import time

    import uvicorn

    from gptforge.common.errors import ConfigError
    from gptforge.launcher.serving.app import build_app

    app = build_app(worker, tok, model_name=name, context=context)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, name="gptforge-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise ConfigError("--port", f"the HTTP server did not start on "
                                        f"{args.host}:{args.port}")
        time.sleep(0.05)
    return server, thread


def _stop_on_signals(worker) -> None:
    """Ctrl-C or SIGTERM: stop after the batch in hand; a second Ctrl-C interrupts it."""
    def stop(signum, frame):
        worker.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def register(verbs) -> None:
    from gptforge.launcher.cli.main import positive_int
    from gptforge.launcher.cli.ranks import add_layout_args

    p = verbs.add_parser("serve", help="an OpenAI-compatible completions server",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="our checkpoint (any layout) or a Hugging Face GPT-2/Llama folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", metavar="NAME", help="the model's id in the API "
                   "(default: the checkpoint's directory name)")
    p.add_argument("--max-batch-size", type=positive_int, default=8, metavar="B",
                   help="requests generated together")
    p.add_argument("--tokenizer", metavar="T", help="tokenizer to use instead of the model's")
    add_layout_args(p)
    p.set_defaults(func=_serve)
