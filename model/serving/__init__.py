"""Serving adapters: the LRU adapter cache, vLLM's LoRA rules, and the two backends (transformers+peft, vLLM)."""
