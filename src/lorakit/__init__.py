"""lorakit: LoRA (Hu et al., ICLR 2022) for any PyTorch model."""
