"""LlamaGen model zoo, checkpoints, model directories, the reference and the vLLM model."""
