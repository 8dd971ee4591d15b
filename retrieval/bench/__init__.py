"""Benchmarks behind `facefind bench`: each times one stage against a simple baseline in the same process."""
