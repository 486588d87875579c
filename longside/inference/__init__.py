"""Using a model: incremental decoding over a local window, generation, sampling, chat."""
