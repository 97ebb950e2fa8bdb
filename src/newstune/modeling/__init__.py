"""Modeling: the encoder and what runs it.

Owns loading pretrained weights (aliases, hashes, the hub), building the classifier with LoRA or a full fine-tune,
the training-time speed-ups that change how the encoder computes (first-token last layer, frozen prefix cache, fast
dropout), and the scorers that turn token batches into logits on each backend (PyTorch, OpenVINO, ONNX Runtime).
May import: `newstune.config`, `newstune.errors`, `newstune.paths`, `newstune.data`.
"""
