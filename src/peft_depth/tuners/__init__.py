"""The four depth methods, each a peft tuner folder (config.py, layer.py, model.py)."""
