"""Real renderer, real player.

The SNES renderer with a preset's echo and reverb makes a loop that repeats exactly what rendering the
music repeated gives. pygame's music player (SDL_mixer) plays the exported files with loops=-1 through
SDL's `disk` audio driver, which writes what it would have sent to the sound card into a file: the capture
must show the first pass (intro + body) as written, then the body again from LOOPSTART (from the smpl loop
for the WAV), with no jump at the seam larger than the largest jump inside the body.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_loops import RATE, make_piece, max_jump, seam_jump, toy_render

from chiptune_forge.export import export_track, normalize
from chiptune_forge.loops import RenderFn, TrackAudio, render_track
from chiptune_forge.midi import Note, Piece
from chiptune_forge.presets import load_preset
from chiptune_forge.render import render_piece

PLAYER = r"""
import os, sys, time
path, capture, frames = sys.argv[1], sys.argv[2], int(sys.argv[3])
import pygame
pygame.mixer.init(frequency=int(sys.argv[4]), size=-16, channels=2, buffer=1024)
pygame.mixer.music.load(path)
pygame.mixer.music.set_volume(1.0)  # SDL_mixer's default is 127/128 in pygame
pygame.mixer.music.play(loops=-1)
# The disk driver runs ahead of real time: what it wrote before play() is silence, so count from here.
start = os.path.getsize(capture)
deadline = time.monotonic() + 60
while os.path.getsize(capture) < start + frames * 4:
    if time.monotonic() > deadline or not pygame.mixer.music.get_busy():
        sys.exit("playback stopped before enough audio was captured")
    time.sleep(0.002)
pygame.mixer.music.stop()
pygame.mixer.quit()
"""


def snes(preset: str, drums: bool = True) -> RenderFn:
    chosen = replace(load_preset(preset), drums=drums)
    return lambda piece, rate: render_piece(piece, chosen, rate)


def test_snes_loop_repeats_exactly():
    """Without the free-running noise of generated drums, the S-DSP render is periodic to the sample."""
    render = snes("snes_dungeon", drums=False)
    piece = make_piece(bars=3, seed=3)
    track = render_track(piece, render, RATE, intro_bars=1)
    s, n = track.loop_start, track.loop_length
    body = [x for x in piece.notes if x.start >= 2.0]
    repeats = [x for x in piece.notes if x.start < 2.0]
    for k in range(5):
        repeats += [Note(x.pitch, x.velocity, x.start + 4.0 * k, x.end + 4.0 * k) for x in body]
    reference = render(Piece(repeats, piece.tempos, piece.time_signatures), RATE)
    played = np.concatenate([track.audio, *[track.audio[s:]] * 4])
    # Once the reverb of the repeats has settled (8 s in), the looped file is the repeated music, bit for bit.
    assert np.array_equal(played[s + 2 * n:s + 4 * n], reference[s + 2 * n:s + 4 * n])


@pytest.fixture(scope="module", params=["toy", "snes_dungeon"])
def exported(request, tmp_path_factory) -> tuple[TrackAudio, Path]:
    """1 intro bar + 2 body bars at 137 qpm, with a note ringing over the body's end into the seam; by the
    toy synth, and by the SNES renderer with echo, reverb and generated drums."""
    piece = make_piece(bars=3, qpm=137.0, seed=11)
    piece.notes.append(Note(67, 127, 3 * 4 * 60 / 137.0 - 0.05, 3 * 4 * 60 / 137.0))
    render = toy_render if request.param == "toy" else snes(request.param)
    track = normalize(render_track(piece, render, RATE, intro_bars=1))[0]
    out = tmp_path_factory.mktemp("playback")
    export_track(track, out, "theme", ("ogg", "wav"))
    return track, out


def capture(path: Path, frames: int, tmp: Path) -> np.ndarray:
    """Play `path` looping forever and return the first `frames` (or more) frames SDL mixed, as float."""
    raw = tmp / f"{path.name}.raw"
    env = {**os.environ, "SDL_AUDIODRIVER": "disk", "SDL_DISKAUDIOFILE": str(raw),
           "SDL_DISKAUDIODELAY": "0", "PYGAME_HIDE_SUPPORT_PROMPT": "1"}
    done = subprocess.run([sys.executable, "-c", PLAYER, str(path), str(raw), str(frames), str(RATE)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    pcm = np.fromfile(raw, dtype="<i2")
    return pcm[: len(pcm) // 2 * 2].reshape(-1, 2).astype(np.float64) / 32768


def align(captured: np.ndarray, reference: np.ndarray) -> int:
    """Where the file's first frame lies in the capture (the device ran silent before play())."""
    first_cap = int(np.flatnonzero(np.any(captured != 0, axis=1))[0])
    first_ref = int(np.flatnonzero(np.any(np.abs(reference) >= 0.5 / 32768, axis=1))[0])
    guess = first_cap - first_ref
    window = min(len(reference), 4096)
    candidates = range(max(0, guess - 8), guess + 9)
    return min(candidates, key=lambda o: np.abs(captured[o:o + window] - reference[:window]).max())


@pytest.mark.parametrize(("fmt", "tolerance"), [("wav", 0.0), ("ogg", 2 / 32768)])
def test_player_loops_back_to_loop_start_without_a_click(exported, tmp_path, fmt, tolerance):
    track, out = exported
    s, n = track.loop_start, track.loop_length
    # The reference is the file as libsndfile decodes it; SDL_mixer decodes Vorbis with stb_vorbis.
    reference, _ = sf.read(str(out / f"theme.{fmt}"), dtype="float64")
    played = capture(out / f"theme.{fmt}", s + 3 * n + RATE, tmp_path)  # a second spare: music may start late
    o = align(played, reference)
    first_pass = played[o:o + s + n]
    second_pass = played[o + s + n:o + s + 2 * n]
    third_pass = played[o + s + 2 * n:o + s + 3 * n]
    assert len(third_pass) == n
    assert np.abs(first_pass - reference).max() <= tolerance
    # After the first pass the player continues at LOOPSTART, not at frame 0 ...
    assert np.abs(second_pass - reference[s:]).max() <= tolerance
    assert np.abs(third_pass - reference[s:]).max() <= tolerance
    assert np.abs(second_pass - reference[:n]).max() > 0.05
    # ... and the seam is no rougher than the body itself.
    body_max = max_jump(reference[s:])
    for seam in (o + s + n, o + s + 2 * n):
        assert max_jump(played[seam - 1:seam + 1]) <= body_max


@pytest.mark.parametrize("rate", [44100, 48000])
def test_the_seam_at_resampled_rates_is_no_larger_than_the_bodys_own_steps(rate: int):
    """At 44.1 and 48 kHz the chip's 32 kHz grid and the output's meet only approximately; the seam stays
    within what the music does from sample to sample anyway."""
    piece = make_piece(bars=3, qpm=137.0, seed=11)
    piece.notes.append(Note(67, 127, 3 * 4 * 60 / 137.0 - 0.05, 3 * 4 * 60 / 137.0))
    track = render_track(piece, snes("snes_battle"), rate, intro_bars=1)
    body = track.audio[track.loop_start:track.loop_end]
    assert seam_jump(track) <= max_jump(body)
