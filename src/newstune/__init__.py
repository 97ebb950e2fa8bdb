"""newstune: news classifiers from BERT-family encoders, with LoRA and mixed precision."""

__version__ = "0.1.0"
