"""TorchX components of torchx-diloco (installed as the package ``torchx_diloco_components``)."""
