"""Dataset building on the VGMIDI corpus: wall time, peak memory and the note-steps kept.

Baseline (../shared/docs/anchors.md, same machine kind): Magenta's convert_dir_to_note_sequences plus
polyphony_rnn_create_dataset take 12.8 s + 159 s and keep about 4% of the transposed pieces. The ratio
printed here is against that figure, and the kept fraction is compared in the same run with what the
80..512-step discard rule would have kept.

Run: .venv/bin/python bench/dataset_speed.py [CORPUS_DIR]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAGENTA_SECONDS = 12.8 + 159.0
TARGET_SECONDS = 60.0


def main() -> int:
    corpus = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/corpus/vgmidi"
    if not corpus.is_dir():
        print(f"corpus not found at {corpus}; pass a folder of MIDI files")
        return 0
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(3):
            out = Path(tmp) / f"ds{run}"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "chiptune_forge", "dataset", "--input-dir", str(corpus),
                            "--output-dir", str(out)], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        summary = json.loads((Path(tmp) / "ds0" / "summary.json").read_text())
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    median = sorted(times)[1]
    steps = summary["note_steps"]
    print(f"files: {summary['files_read']} read, {summary['files_used']} used")
    print(f"train sequences: {summary['splits']['train']['sequences']}, "
          f"events: {summary['splits']['train']['events']}")
    print(f"wall time (whole process, median of 3): {median:.2f} s   target < {TARGET_SECONDS:.0f} s")
    print(f"peak RSS: {peak_mb:.0f} MB")
    print(f"kept note-steps: {steps['kept_fraction']:.1%}   80..512 discard rule: "
          f"{steps['reference_discard_rule_fraction']:.1%}   target >= 90%")
    print(f"speed-up vs Magenta's pipeline ({MAGENTA_SECONDS:.0f} s): {MAGENTA_SECONDS / median:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
