"""Training: `star pretrain`, `star finetune`, `star eval`, `star export` and their parts.

Exit codes of the training commands (the SLURM launchers rely on them):

- 0  (EXIT_OK): the run finished its schedule.
- 75 (EXIT_STOPPED, sysexits' EX_TEMPFAIL): stopped early on SIGUSR1 / SIGTERM after saving a
  checkpoint; start the same command again (same run dir) to resume.
- 76 (EXIT_NONFINITE): stopped after ``max_nonfinite_in_row`` consecutive non-finite steps;
  a checkpoint of the last good weights was saved. Resuming will likely diverge again:
  lower the learning rate or inspect the data first.
- 74 (EXIT_IO, sysexits' EX_IOERR): a checkpoint could not be written (no space left on the
  device, a quota, a failing file system); the message names the device, the path and the space
  a checkpoint needs. Fix the cause and start the same command again: it removes the partial
  checkpoint and resumes from the last committed one.
- 2: bad command line, config or input file.
"""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_STOPPED = 75
EXIT_NONFINITE = 76
EXIT_IO = 74
