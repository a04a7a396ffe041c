"""What a run writes under --output: key layout, lock, done index, manifest parts, run statistics."""
