"""TensorFlow and Keras for the model code, imported once and quietly.

While it loads, TensorFlow's C++ runtime prints start-up notes (oneDNN, "could not find cuda drivers",
"All log messages before absl::InitializeLog() is called ...") before its logging is configured, so
TF_CPP_MIN_LOG_LEVEL cannot hold them back; a user of `train` or `evaluate` would take them for problems.
They are caught at the file-descriptor level during the import and dropped; anything else written to
stderr meanwhile (errors, Python warnings) is passed on. Setting TF_CPP_MIN_LOG_LEVEL to 0 or 1 shows
everything.

TensorFlow's CPU tensors come from its BFC allocator (TF_CPU_ALLOCATOR_USE_BFC), which keeps freed blocks
for reuse, instead of from malloc. A training step allocates and frees tens of buffers of tens of MB;
malloc hands blocks that large back to the system and maps fresh zeroed pages for them on the next step,
which cost a quarter of the step's time in page faults. Setting the variable to false restores malloc.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

_CHATTER = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IW]\d{4} )")


def _quiet_import() -> None:
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") in ("0", "1") or "tensorflow" in sys.modules:
        return  # the plain imports below do it
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                import keras  # noqa: F401
                import tensorflow  # noqa: F401
            finally:  # also when the import fails: its own diagnostics must reach the user
                sys.stderr.flush()
                os.dup2(saved, 2)
                capture.seek(0)
                text = capture.read().decode("utf-8", errors="replace")
                kept = "".join(line for line in text.splitlines(keepends=True) if not _CHATTER.match(line))
                if kept:
                    sys.stderr.write(kept)
                    sys.stderr.flush()
    finally:
        os.close(saved)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
_quiet_import()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

__all__ = ["keras", "tf"]
