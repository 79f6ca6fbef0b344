"""Data loaders: DALI pipelines (GPU nvJPEG on clusters, CPU here) and a PyTorch/PIL baseline."""
