"""A command's run: its command line and config file, run folder and lock, process group,
signals, what it records (log, summary.csv) and the checks made before anything is written."""
