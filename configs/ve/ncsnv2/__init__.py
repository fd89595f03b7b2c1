"""score_sde's NCSNv2 configs (CIFAR-10, CelebA; its LSUN bedroom config is not carried)."""
