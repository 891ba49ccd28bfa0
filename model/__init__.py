"""torch and transformers, no Prefect: base models, chunking, the toy world and model, the hypernetwork."""
