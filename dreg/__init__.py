"""dreg: doubly reparameterized gradient estimators (Tucker et al., ICLR 2019) in PyTorch."""

__version__ = "0.1.0"
