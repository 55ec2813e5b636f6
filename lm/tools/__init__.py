"""What only the scripts use: Hugging Face and GGUF conversion, HLO reading, TPU topologies that are not here."""
