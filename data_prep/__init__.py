"""Offline data preparation: synthetic ImageNet-like data, sharding into WebDataset tars, verification."""
