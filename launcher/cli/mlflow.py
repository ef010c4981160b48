"""``gptforge mlflow sync <run.dir>``: send what a run left in its MLflow outbox (the server was
down at the end); ``gptforge mlflow uri <run.dir>``: the tracking URI and run id of a run."""

from __future__ import annotations

from pathlib import Path


def _sync(args) -> int:
    from gptforge.launcher.tracking.outbox import read_state
    from gptforge.launcher.tracking.sender import sync
    from gptforge.launcher.rundir import RunDirError

    run_dir = Path(args.run_dir)
    state = read_state(run_dir)
    if not state.get("run_uid"):
        raise RunDirError(f"run dir {run_dir}: no MLflow state ({run_dir}/mlflow/state.json); "
                          f"was it trained with --logging.mlflow=true?")
    try:
        sent, _ = sync(run_dir)
    except Exception as err:  # noqa: BLE001 (the server's answer, in one line)
        from gptforge.launcher.tracking.outbox import short_error

        raise RunDirError(f"MLflow at {state.get('tracking_uri')}: {short_error(err)} (run dir "
                          f"{run_dir}; nothing lost, try again later)") from None
    state = read_state(run_dir)
    print(f"[gptforge] sent {sent} records to MLflow run {state.get('run_id')} at "
          f"{state.get('tracking_uri')}; nothing left")
    return 0


def _uri(args) -> int:
    from gptforge.launcher.tracking.outbox import read_state

    state = read_state(Path(args.run_dir))
    print(f"tracking uri  {state.get('tracking_uri', '-')}")
    print(f"experiment    {state.get('experiment', '-')}")
    run_id = state.get("run_id") or "not created yet"
    print(f"run           {state.get('run_name', '-')} ({run_id})")
    print(f"unsent        {state.get('unsent', 0)}")
    uri = state.get("tracking_uri", "")
    if uri.startswith("sqlite:"):
        print(f"view          mlflow ui --backend-store-uri {uri}")
    return 0


def register(verbs) -> None:
    p = verbs.add_parser("mlflow", help="a run's MLflow side: sync what is spooled, show its URI")
    sub = p.add_subparsers(dest="mlflow_verb", required=True, metavar="ACTION")
    s = sub.add_parser("sync", help="send the records a run could not send (server was down)")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.set_defaults(func=_sync)
    u = sub.add_parser("uri", help="tracking URI, run id, unsent records, `mlflow ui` command")
    u.add_argument("run_dir", metavar="RUN_DIR")
    u.set_defaults(func=_uri)
