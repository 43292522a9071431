"""vLLM general plugin: registers the LlamaGen architecture in every vLLM process.

Imports vLLM only when vLLM calls it, so the names here are cheap to import."""

# The logits processor every LlamaGen engine must load (see model_registry/cfg.py).
CFG_PROCESSOR = "model_registry.cfg:CFGLogitsProcessor"


def register() -> None:
    from vllm import ModelRegistry

    if "LlamaGenForCausalLM" not in ModelRegistry.get_supported_archs():
        # A lazy "module:Class" string: vLLM imports the model only when it is used.
        ModelRegistry.register_model("LlamaGenForCausalLM",
                                     "model_registry.vllm_model:LlamaGenForCausalLM")
