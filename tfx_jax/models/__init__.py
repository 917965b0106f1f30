"""Models: the Transfusion transformer and the image VAE."""
