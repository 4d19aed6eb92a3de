"""The encrypted weight store: import, open, verify and re-key models (the format itself is
`garrison_workers.weights.store_format`, shared with the workers that read it)."""
