"""Progressive GAN (Karras et al. 2018): the pytorch_GAN_zoo layout (`zoo`) and the official TF one (`tf`)."""
