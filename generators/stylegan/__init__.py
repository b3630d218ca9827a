"""StyleGAN (Karras et al. 2019): the network, its discriminator and the official TF pickles."""
