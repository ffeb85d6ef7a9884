"""Trainers: featurizer, model, shard reader, training loop, launchers, evaluation."""
