"""Config groups of `python -m liverfusion.prepare` (rules/, preset/); a package so Hydra finds it by pkg://."""
