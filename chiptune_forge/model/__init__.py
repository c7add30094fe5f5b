"""Training, evaluation and export of the polyphony LSTM: the only part of chiptune-forge that uses TensorFlow.

Importing this package does not import TensorFlow; its submodules do. TensorFlow's C++ start-up chatter is
quieted unless the user asked for it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
