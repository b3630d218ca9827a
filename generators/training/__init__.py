"""Progressive GAN training (WGAN-GP + drift, fade-in, EMA) for small generators such as the demo's."""
