"""One module per paper key (see docs/architecture.md); shared continual-learning pieces live here too."""
