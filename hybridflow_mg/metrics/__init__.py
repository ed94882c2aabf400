"""Per-step metrics: JSON lines in the run directory, a console curve, timers."""
