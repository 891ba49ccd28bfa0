"""torch and transformers, no Prefect: base models, chunking, the toy world and model, the hypernetwork."""

from model.bars import library_bars_follow_terminal

library_bars_follow_terminal()  # before transformers is imported: its bars follow the project's rule
