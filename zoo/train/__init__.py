"""The training layer: the run config, data and tokenizers, objectives, the LightningModule, ``train()``."""
