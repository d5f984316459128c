"""Ray actors: rollout, reward pool, learner. Plain classes made remote by the driver."""
