"""The checkpoint layer: files, the Hub, zoo checkpoints, and the transformers importers.

* :mod:`.files`: safe weight reading (safetensors; ``.bin`` only with ``weights_only=True``), atomic writes.
* :mod:`.hub`: downloads and pushes through ``huggingface_hub``.
* :mod:`.card`: the model card.
* :mod:`.pretrained`: ``save_pretrained`` / ``from_pretrained`` / ``load_model``, every format version.
* :mod:`.importers`: transformers checkpoints (llama, mistral, qwen2, mixtral, qwen2_moe, olmoe, deepseek_v3).
"""
