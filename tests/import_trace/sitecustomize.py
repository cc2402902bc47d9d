"""Records the project modules each stage process imports (tests/test_pipeline_e2e.py puts this folder
on PYTHONPATH while `dvc repro` runs, so Python loads it at start-up in every stage process).

At exit, a process started as ``python -m stages.<name> [item]`` writes
``$IMPORT_TRACE_DIR/<stage>.json``: ``{"stage": "<name>[@item]", "modules": [paths relative to the cwd]}``.
"""

import atexit
import json
import os
import sys


def _record() -> None:
    out = os.environ.get("IMPORT_TRACE_DIR")
    root = os.getcwd()
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not out or os.path.dirname(script) != os.path.join(root, "stages"):
        return
    name = os.path.splitext(os.path.basename(script))[0] + (f"@{sys.argv[1]}" if len(sys.argv) > 1 else "")
    modules = set()
    for module in list(sys.modules.values()):
        path = os.path.abspath(getattr(module, "__file__", None) or "")
        rel = os.path.relpath(path, root)
        if rel.split(os.sep)[0] in ("pipeline", "stages") and path.startswith(root + os.sep):
            modules.add(rel.replace(os.sep, "/"))
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump({"stage": name, "modules": sorted(modules)}, fh)


atexit.register(_record)
