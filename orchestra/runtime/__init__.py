"""Running a compiled plan: the superstep loop, its tasks, routing, checkpoints, the ledger,
the tool gateway, the guards at each barrier and the drivers that supervise a run."""
