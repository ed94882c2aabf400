"""Models: per-parameter layouts (`layouts`, `rowmaps`); builders and HF I/O land here too."""
