"""A tiny pygame game whose music comes from chiptune-forge: a title screen and three rooms.

Build the music first:   chiptune-forge build example_game
Then play:               python example_game/game.py
Keys: Enter starts, 1/2/3 (or arrows) change room, V wins a battle (jingle), Esc quits.

Each room's track is played with pygame.mixer.music and loops=-1, so the LOOPSTART/LOOPLENGTH tags the
build wrote take effect: the intro plays once, then the body loops seamlessly. `--demo` visits every room
for a moment and quits (headless with SDL_VIDEODRIVER=dummy and SDL_AUDIODRIVER=disk).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import pygame

HERE = Path(__file__).resolve().parent
MUSIC = HERE / "music"
SIZE = (480, 320)
ROOMS = {
    "title": ((24, 24, 64), "chiptune-forge quest", "Enter: start   Esc: quit"),
    "town": ((40, 110, 60), "Town", "1 town  2 dungeon  3 battle"),
    "dungeon": ((45, 35, 55), "Dungeon", "1 town  2 dungeon  3 battle"),
    "battle": ((120, 30, 30), "Battle!", "V: win the battle"),
    "victory": ((200, 170, 40), "Victory!", "the jingle plays once, then back to town"),
}
ROOM_KEYS = {pygame.K_1: "town", pygame.K_2: "dungeon", pygame.K_3: "battle", pygame.K_LEFT: "town",
             pygame.K_DOWN: "dungeon", pygame.K_RIGHT: "battle"}
MUSIC_END = pygame.USEREVENT + 1


def track_path(room: str, music: Path = MUSIC) -> Path:
    for suffix in (".ogg", ".wav"):
        path = music / f"{room}{suffix}"
        if path.is_file():
            return path
    raise SystemExit(f"{music / room}.ogg is missing: build the soundtrack first with "
                     f"'chiptune-forge build {HERE.name}'")


def play(room: str, music: Path) -> None:
    """Start a room's music: rooms loop (the file's loop tags choose the loop); the victory jingle plays once."""
    path = track_path(room, music)
    pygame.mixer.music.load(str(path))
    pygame.mixer.music.play(loops=0 if room == "victory" else -1)
    print(f"room {room}: playing {path.name}", flush=True)


def draw(screen: pygame.Surface, font: pygame.font.Font, room: str) -> None:
    colour, title, hint = ROOMS[room]
    screen.fill(colour)
    screen.blit(font.render(title, True, (255, 255, 255)), (24, 120))
    screen.blit(font.render(hint, True, (220, 220, 220)), (24, 180))
    pygame.display.flip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="visit every room briefly and quit")
    parser.add_argument("--room-seconds", type=float, default=1.5, help="time per room in --demo")
    parser.add_argument("--music", type=Path, default=MUSIC, help="folder of the built tracks")
    args = parser.parse_args(argv)
    for room in ROOMS:
        track_path(room, args.music)
    pygame.mixer.pre_init(frequency=44100, size=-16, channels=2)
    pygame.init()
    screen = pygame.display.set_mode(SIZE)
    pygame.display.set_caption("chiptune-forge example game")
    font = pygame.font.Font(None, 36)
    pygame.mixer.music.set_endevent(MUSIC_END)
    clock = pygame.time.Clock()
    room = "title"
    play(room, args.music)
    demo = ["town", "dungeon", "battle", "victory"] if args.demo else []
    elapsed = 0.0
    running = True
    while running:
        for event in pygame.event.get():
            if event.type == pygame.QUIT or (event.type == pygame.KEYDOWN and event.key == pygame.K_ESCAPE):
                running = False
            elif event.type == pygame.KEYDOWN and room == "title" and event.key == pygame.K_RETURN:
                room = "town"
                play(room, args.music)
            elif event.type == pygame.KEYDOWN and room != "title" and event.key in ROOM_KEYS:
                if ROOM_KEYS[event.key] != room:
                    room = ROOM_KEYS[event.key]
                    play(room, args.music)
            elif event.type == pygame.KEYDOWN and room == "battle" and event.key == pygame.K_v:
                room = "victory"
                play(room, args.music)
            elif event.type == MUSIC_END and room == "victory" and not args.demo:
                room = "town"
                play(room, args.music)
        draw(screen, font, room)
        elapsed += clock.tick(30) / 1000.0
        if args.demo and elapsed >= args.room_seconds:
            elapsed = 0.0
            if not demo:
                running = False
            else:
                room = demo.pop(0)
                play(room, args.music)
    pygame.mixer.music.stop()
    pygame.quit()
    print("bye", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
