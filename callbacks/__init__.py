"""Lightning callbacks of qgen, referenced in YAML as ``callbacks.<Name>`` under ``trainer.callbacks``."""
