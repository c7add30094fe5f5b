"""The shipped preset files (*.toml). Installed as the data package `chiptune_forge.preset_library`;
code finds them with `chiptune_forge.presets.shipped_presets_dir()`."""
