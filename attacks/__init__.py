"""What an adversary does with gradients: latent exaggeration, finetuning, retraining."""
