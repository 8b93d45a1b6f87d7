"""A command's run: its configuration, run folder and lock, process group, signals and the
checks made before anything is written."""
