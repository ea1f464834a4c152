"""The hosts library (scripts/hosts.py, loaded by path: scripts/ is no package) for the multi-host tests
and their conftest (a helper module, not a test module)."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load_hosts_module():
    name = "molm_hosts"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "hosts.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


hosts_lib = _load_hosts_module()
