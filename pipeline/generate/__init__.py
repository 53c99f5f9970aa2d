"""The generation job: typed config, work manifest, the sampler stage on Ray Data, and the run itself."""
