"""The device runtime must never import torch (nor the offline toolchain)."""

import subprocess
import sys
import textwrap


def test_edge_cpu_path_never_imports_torch(tmp_path):
    # Run in a fresh interpreter: this test session itself may have torch loaded.
    code = textwrap.dedent(
        """
        import sys, pkgutil, importlib
        import edge
        for m in pkgutil.walk_packages(edge.__path__, "edge."):
            importlib.import_module(m.name)
        from edge.cli import main
        rc = main(["selftest"])
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")
                     or m == "toolchain" or m.startswith("toolchain.") or m == "scipy" or m.startswith("scipy."))
        print("BAD", bad)
        sys.exit(0 if not bad and rc == 0 else 3)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BAD []" in r.stdout
