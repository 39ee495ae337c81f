"""Any PyTorch model as a graph of layers: capture its forward, cut it into layers, run them."""
