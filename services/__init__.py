"""The three OPD services (rollout, teacher, learner) and the `opd` command line."""
