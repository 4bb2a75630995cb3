"""Networks of the template; plain ``nn.Module``s live in :mod:`flatsophia.models.components`."""
