"""A software S-DSP (the SNES sound chip): BRR samples, pitch and Gaussian interpolation, envelopes, noise,
8 voices and the echo unit, computed a note or a block at a time with numpy.

brr.py: the sample format; dsp.py: the voice pipeline; voices.py: voice allocation; echo.py: the output
stage and echo; instruments.py: the built-in procedural instruments and drum kit.
"""
