"""Training, evaluation and export of the polyphony LSTM: the only part of chiptune-forge that uses TensorFlow.

Importing this package does not import TensorFlow; its submodules do, through `framework`, which keeps
TensorFlow's C++ start-up chatter off the terminal unless the user asked for it.
"""
