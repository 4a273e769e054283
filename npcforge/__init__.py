"""npcforge: per-character pruned language models for game NPCs, built offline and served many at once."""
__version__ = "0.5.0"
