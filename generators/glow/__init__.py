"""Glow (Kingma & Dhariwal 2018): the flow, its layers and the y0ast Glow-PyTorch reader."""
