"""``eossl bench``: the measurements behind docs/BENCHMARKS.md, wired from the stages they time.

Benchmarks are launch-side wiring, not part of a stage: each one drives a stage's real code (the ingest
writer, the streaming loader, the training loop) against a baseline in the same run. ``harness`` holds the
shared timing (interleaved runs, the CPU meter, result printing); ``configs`` each bench's settings, whose
defaults are the command line's; ``cli`` the subcommands. Submodules import their stage lazily, so that
``eossl --help`` stays instant.
"""
