"""One rank of a multi-layout launch: trains each layout in turn, re-using the process group.

argv[1]: a JSON file {"layouts": {name: [overrides]}, "common": [overrides]}. For each layout the
logging rank writes <dir>/<name>.json with the logged records. ``{dir}`` in an override is
replaced by that directory (a layout can load another layout's checkpoint).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from gptforge.common.shutdown import collect_nothing_at_exit
from gptforge.launcher.config import load_config
from gptforge.launcher.run.entry import run
from gptforge.parallel.context import destroy_parallel

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def main() -> None:
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    try:
        for name, overrides in spec["layouts"].items():
            run_dir = spec_path.parent / name
            overrides = [o.replace("{dir}", str(spec_path.parent)) for o in overrides]
            cfg = load_config([TINY], [*spec["common"], *overrides, f"--run.dir={run_dir}"])
            records = run(cfg).records
            if records:
                (spec_path.parent / f"{name}.json").write_text(json.dumps({"records": records}))
    finally:
        destroy_parallel()


if __name__ == "__main__":
    collect_nothing_at_exit()  # as a rank ends (common/shutdown.py)
    torch.set_num_threads(1)
    main()
