"""StyleGAN2: the network (rosinality layout, with its .pt reader) and the NVlabs pickle reader."""
