"""The engine: running E members of one NumPyro model (the member axis, starts, the
compiled programs and the scanned run loop, mini-batches, sharding, stopping,
checkpoints, argument checks). Knows nothing of weights or ArviZ."""
