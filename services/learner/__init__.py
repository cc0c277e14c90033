"""Learner service: trains the student on scored trajectories and publishes weight versions."""
