"""Teacher service: scores trajectories into the finite teacher-score cache (M replicas)."""
