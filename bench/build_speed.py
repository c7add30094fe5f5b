"""Build-step speed on example_game: cold build, no-op rebuild, preset-only change.

Prints, in one run (whole `chiptune-forge build` processes, median of 3 where cheap):
- cold build with generation (no lock, no cache) and cold build from the lock (no cache);
- no-op rebuild (target: at most 0.3 s for the whole process);
- preset-only change (re-render only), and whether TensorFlow was imported (it must not be).
The baseline for the no-op ratio is the target itself (0.3 s); for the preset change, the cold build.

Run: .venv/bin/python bench/build_speed.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOOP_TARGET = 0.3


def run_build(manifest: Path, *extra: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "chiptune_forge", "build", str(manifest), *extra],
                         capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"build failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return elapsed, out.stdout


def tf_imported_by_build(manifest: Path) -> bool:
    code = ("import sys; from chiptune_forge.builder import build; r = build(sys.argv[1]); "
            "assert not r.failed, [t.error for t in r.failed]; print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(manifest)], capture_output=True, text=True, check=True)
    return out.stdout.strip().endswith("True")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        game = Path(tmp) / "example_game"
        shutil.copytree(REPO / "example_game", game, ignore=shutil.ignore_patterns("music", ".chiptune"))
        manifest = game / "chiptune.toml"
        lock = game / "chiptune.lock"
        saved_lock = lock.read_bytes() if lock.is_file() else None
        lock.unlink(missing_ok=True)

        cold_gen, _ = run_build(manifest)
        shutil.rmtree(game / ".chiptune")
        shutil.rmtree(game / "music")
        cold_lock, _ = run_build(manifest)
        noop = sorted(run_build(manifest)[0] for _ in range(3))[1]

        text = manifest.read_text()
        manifest.write_text(re.sub(r'preset = "snes"\n', 'preset = "snes_dry"\n', text, count=1))
        start = time.perf_counter()
        tf = tf_imported_by_build(manifest)
        preset_change = time.perf_counter() - start
        if saved_lock is not None:
            lock.write_bytes(saved_lock)

    print(f"cold build, generating every take:   {cold_gen:6.2f} s")
    print(f"cold build from chiptune.lock:        {cold_lock:6.2f} s")
    print(f"no-op rebuild (median of 3):          {noop:6.3f} s   target <= {NOOP_TARGET} s "
          f"(ratio to target {noop / NOOP_TARGET:.2f})")
    print(f"preset-only change (re-render only):  {preset_change:6.2f} s   "
          f"({preset_change / cold_gen:.2f}x the cold build); TensorFlow imported: {tf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
