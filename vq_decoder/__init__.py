"""The LlamaGen VQ tokenizer: token grids to pixels, and image encoding."""
