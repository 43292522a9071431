"""The engine layer: vLLM configured for the machine, sampling options, conditions and
prompts, seeds, the decoder and caption services, offline generation and the per-model
generation service. It knows no HTTP; `server/`, `bench/` and the CLI build on it."""
